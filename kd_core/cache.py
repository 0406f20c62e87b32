"""Teacher-output cache: a frozen source's logits on every training image, computed once.

Every trial of a KD sweep distils from the same frozen teacher (and assistants), so their
forward pass on the training set is the same in every trial and epoch. The cache stores the
raw logits (the temperature stays sweepable) in a file under the sweep's storage, keyed by
the source's stage key, the dataset and the augmentation views, and every trial loads it
instead of running the source.

Without random augmentation the cache is exact (one view). With it, a fixed, seeded bank of
`views` augmentations per image is drawn once; training then shows, for each image in each
epoch, one view picked at random from its bank, and the cached logits of exactly that view.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from torch import nn

from kd_core.data.base import Split, SplitLike

CACHE_FILE = "logits.pt"
CacheDtype = Literal["float16", "float32"]


class CacheUnavailableError(ValueError):
    """The training split cannot be replayed view by view (so its logits cannot be cached)."""


def replayable(split: SplitLike) -> bool:
    """Whether `split` is device-resident and its augmentation (if any) can replay stored views."""
    if not isinstance(split, Split):
        return False
    transform = split.transform
    return transform is None or (hasattr(transform, "draw") and hasattr(transform, "apply"))


def _exact(split: Split) -> bool:
    """Whether every view of an image is the same (no random augmentation)."""
    return split.transform is None or split.transform.draw(1, torch.Generator()) is None


def _view_params(split: Split, views: int, seed: int) -> torch.Tensor | None:
    """(views, N, P) augmentation parameters, or None when every view of an image is the same."""
    if _exact(split):
        return None
    return torch.stack([split.transform.draw(len(split), torch.Generator().manual_seed(seed * 1_000_003 + v))
                        for v in range(views)])


def _view_images(split: Split, index: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
    """Model inputs of the images at `index`, each in the view given by its row of `params`."""
    images = split.images[index]
    if split.transform is None:
        return images
    return split.transform.apply(images, params)


@dataclass(frozen=True)
class SourceLogitCache:
    """Cached logits of a stage's frozen sources, (views, N, C) each, and the views' parameters."""

    logits: list[torch.Tensor]
    view_params: torch.Tensor | None  # (views, N, P) on the CPU; None: one exact view

    @property
    def views(self) -> int:
        return 1 if self.view_params is None else len(self.view_params)

    def batches(
        self, split: Split, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """Shuffled training batches (images, labels, source logits): each image in one of its
        cached views, with that view's logits (float32, on the images' device)."""
        n = len(split)
        device = split.labels.device
        order = torch.randperm(n, generator=generator)
        view = torch.randint(self.views, (n,), generator=generator)
        for start in range(0, n, batch_size):
            index, chosen = order[start : start + batch_size], view[start : start + batch_size]
            params = None if self.view_params is None else self.view_params[chosen, index]
            on_device = index.to(device, non_blocking=True)
            chosen_on_device = chosen.to(device, non_blocking=True)
            images = _view_images(split, on_device, params)
            yield images, split.labels[on_device], [
                logits[chosen_on_device, on_device].float() for logits in self.logits]

    def to(self, device: torch.device | str) -> SourceLogitCache:
        return SourceLogitCache([logits.to(device) for logits in self.logits], self.view_params)


def cache_key(source_key: str, data_key: str, split: Split, views: int, seed: int, dtype: CacheDtype) -> str:
    """What determines a source's cached logits: the source, the data, the views and the dtype."""
    views = 1 if _exact(split) else views
    canonical = json.dumps({"source": source_key, "data": data_key, "transform": repr(split.transform),
                            "views": views, "seed": seed, "dtype": dtype, "n": len(split)}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@torch.no_grad()
def compute_logits(
    model: nn.Module, split: Split, params: torch.Tensor | None, dtype: CacheDtype, batch_size: int = 512
) -> torch.Tensor:
    """(views, N, C) logits of `model` in eval mode on every view of every image."""
    was_training = model.training
    model.eval()
    device = split.labels.device
    views = []
    for view in range(1 if params is None else len(params)):
        chunks = []
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            view_params = None if params is None else params[view, index]
            chunks.append(model(_view_images(split, index.to(device), view_params)).to(getattr(torch, dtype)))
        views.append(torch.cat(chunks).cpu())
    model.train(was_training)
    return torch.stack(views)


def load_or_build(
    root: str | Path, source_key: str, data_key: str, model: nn.Module, split: Split,
    *, views: int = 4, seed: int = 0, dtype: CacheDtype = "float16",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One source's cached (views, N, C) logits and the views' parameters, memory-mapped from
    `root/<key>/`; computed first if absent, by one process only (a file lock per key)."""
    if not replayable(split):
        raise CacheUnavailableError("the training split cannot replay its augmentation views")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    key = cache_key(source_key, data_key, split, views, seed, dtype)
    directory = Path(root) / key
    path = directory / CACHE_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory / ".lock")):
            if not path.exists():  # nobody filled it while we waited
                params = _view_params(split, views, seed)
                logits = compute_logits(model, split, params, dtype)
                handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
                os.close(handle)
                torch.save({"logits": logits, "view_params": params}, tmp)
                os.replace(tmp, path)  # readers see a complete file or none
    stored = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    return stored["logits"], stored["view_params"]


def build_cache(
    root: str | Path, sources: Sequence[tuple[str, nn.Module]], data_key: str, split: Split,
    *, views: int = 4, seed: int = 0, dtype: CacheDtype = "float16",
) -> SourceLogitCache:
    """The cache of several sources `(stage key, model)` on one split, on the split's device."""
    logits, params = [], None
    for source_key, model in sources:
        source_logits, params = load_or_build(root, source_key, data_key, model, split,
                                              views=views, seed=seed, dtype=dtype)
        logits.append(source_logits)
    return SourceLogitCache(logits, params).to(split.labels.device)
