"""The training protocol's per-epoch draws, and the teacher-output cache that replays them.

Protocol. `fit` draws each epoch's shuffle and augmentation from (seed, epoch) alone
(`epoch_draws`): a permutation of the training images and one augmentation view (crop offsets,
flip bit) per image, indexed by image, so batch b of epoch e is the same for every method and
every batch size that splits the order alike: a KD student, its CE baseline of the same seed,
a SimKD or SOKD student all see the same inputs, with the cache on or off. Splits that cannot
replay views (DataLoader-backed image folders) keep their own `batches`.

Teacher-output cache. Every trial of a KD sweep distils from the same frozen teacher (and
assistants), so their logits on a given view of a given image are the same in every trial.
The cache stores raw logits (the temperature stays sweepable) under the sweep's storage, keyed
by the source's stage key, the data and the mode, and trials read them instead of running the
sources. Three modes:

- exact (the split has no random augmentation): one view, (1, N, C) logits, computed once.
- per epoch (`views=None`, the default): epoch e of seed s shows exactly the views a live
  teacher would see (`epoch_draws(split, s, e)`), so training with the cache equals training
  without it. The logits of (s, e), (N, C), are computed by the first trial that reaches that
  epoch (under a file lock) into `<key>/seed<s>/epoch<e>.pt` and memory-mapped by the others:
  E * N * C values on disk per seed (2.2 GB in float16 for CIFAR-100's 45,000 training images,
  100 classes and 240 epochs). Only the seeds and epochs trials reach are ever computed.
- bank (`views=K`, an explicit approximation): a fixed, seeded bank of K views per image is
  drawn once; each epoch shows every image in one of its K views (picked per (seed, epoch)),
  with that view's cached logits. K * N * C values on disk, but a student then sees only K
  augmentations of each image for the whole run, where the live protocol (and its CE baseline)
  sees a fresh one every epoch: the training protocol changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from torch import nn

from kd_core.data.base import Split, SplitLike

CACHE_FILE = "logits.pt"
LOG = logging.getLogger("kdsweep")
CacheDtype = Literal["float16", "float32"]
#: The version of `epoch_draws`, part of every per-epoch cache key: a change to the draws must
#: never replay logits of other views.
PROTOCOL = "epoch-draws-v1"
_BANK_STREAM = 1  # the bank's per-epoch view choice: a stream apart from the order and views


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


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one epoch of training seed `seed`; `stream` separates independent draws.
    Stream 0 (the order, then the views) is seeded as `fit`'s shuffle always was."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + (stream << 40))


@dataclass(frozen=True)
class EpochDraws:
    """One epoch's shuffle and augmentation: `order` (N,), a permutation of the image indices,
    and `views` (N, P), image i's augmentation parameters in row i (None: no random
    augmentation). Both on the CPU."""

    order: torch.Tensor
    views: torch.Tensor | None


def epoch_draws(split: Split, seed: int, epoch: int) -> EpochDraws:
    """The draws of epoch `epoch` (1-based) of training seed `seed`: a function of (seed, epoch)
    and the split's size and transform only, never of the batch size, the method or the cache."""
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(len(split), generator=generator)
    views = None if _exact(split) else split.transform.draw(len(split), generator)
    return EpochDraws(order, views)


def _view_images(split: Split, index: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
    """Model inputs of the images at `index` (on the split's device), each in the view given by
    its row of `params` (len(index), P)."""
    images = split.images[index]
    if split.transform is None:
        return images
    return split.transform.apply(images, params)


Shard = Callable[[torch.Tensor], torch.Tensor]  # a data-parallel rank's rows of a batch


def _protocol_batches(
    split: Split, batch_size: int, order: torch.Tensor, views: torch.Tensor | None, shard: Shard | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, index on the device) of each batch of `order`, image i in view `views[i]`;
    with `shard`, only the rows of each batch it keeps (`kd_core.distributed.DataParallel.shard`)."""
    device = split.labels.device
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if shard is not None:
            index = shard(index)
        on_device = index.to(device, non_blocking=True)
        images = _view_images(split, on_device, None if views is None else views[index])
        yield images, split.labels[on_device], on_device


def training_batches(
    split: SplitLike, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches (images, labels) of epoch `epoch` of seed `seed`, as `fit` trains on
    them without a cache: the `epoch_draws` of a replayable split, else the split's own shuffle."""
    for images, labels, _index in indexed_training_batches(split, batch_size, seed, epoch):
        yield images, labels


def indexed_training_batches(
    split: SplitLike, batch_size: int, seed: int, epoch: int, shard: Shard | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """`training_batches` with each batch's dataset indices into `split`, (n,) int64 on the
    split's device: (images, labels, index). The index is None for a split that is not
    `replayable` (it shuffles on its own and does not say which images it drew). With `shard`,
    each batch is cut to the rows it keeps (a replayable split draws only those images)."""
    if not replayable(split):
        for images, labels in split.batches(batch_size, epoch_generator(seed, epoch)):
            yield (images, labels, None) if shard is None else (shard(images), shard(labels), None)
        return
    assert isinstance(split, Split)
    draws = epoch_draws(split, seed, epoch)
    yield from _protocol_batches(split, batch_size, draws.order, draws.views, shard)


def fill_batch_size(device: torch.device) -> int:
    """The batch size of a cache fill: large batches on a GPU; on a CPU, large batches' activations
    leave the caches (resnet32 fills 2000 images ~2x slower in batches of 512 than of 128)."""
    return 128 if device.type == "cpu" else 1024


@torch.no_grad()
def compute_logits(
    model: nn.Module, split: Split, views: torch.Tensor | None, dtype: CacheDtype, batch_size: int | None = None
) -> torch.Tensor:
    """(N, C) logits of `model` in eval mode on every image of `split`, image i in view
    `views[i]` ((N, P); None: the only view), on the CPU in `dtype`; `batch_size` None:
    `fill_batch_size` of the split's device. Logits that are finite but beyond float16's range
    (a diverged teacher's can be) are kept in float32: float16 would make them infinite, and the
    method would then train on NaN where the teacher itself gives finite logits."""
    was_training = model.training
    model.eval()
    device = split.labels.device
    batch_size = batch_size or fill_batch_size(device)
    chunks = []
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        images = _view_images(split, index.to(device), None if views is None else views[index])
        chunks.append(model(images).float().cpu())
    model.train(was_training)
    logits, stored = torch.cat(chunks), getattr(torch, dtype)
    finite = logits[logits.isfinite()]
    fits = finite.numel() == 0 or finite.abs().max().item() <= torch.finfo(stored).max
    return logits.to(stored if fits else torch.float32)


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors at `path`, memory-mapped; None when the file is absent or does not load."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception:  # truncated or overwritten: the caller computes it again
        return None


def _load_or_fill(path: Path, fill: Callable[[], dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The tensors stored at `path`, memory-mapped; `fill()` computes them first if the file is
    absent, in one process only (a lock per directory; readers see a complete file or none).
    A file that does not load is set aside (`<name>.corrupt-<time>`) and computed again."""
    if (stored := _load(path)) is not None:
        return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / ".lock")):
        if (stored := _load(path)) is not None:  # filled while we waited
            return stored
        if path.exists():
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.replace(path, aside)
            LOG.warning("teacher-output cache file %s did not load: set aside as %s, computing it again", path, aside)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        torch.save(fill(), tmp)
        os.replace(tmp, path)
    return torch.load(path, weights_only=True, mmap=True, map_location="cpu")


def cache_key(
    source_key: str, data_key: str, split: Split, views: int | None, seed: int, dtype: CacheDtype
) -> str:
    """What determines a source's cached logits: the source, the data, the mode (exact, per
    epoch or a bank of `views`, drawn with `seed`) and the dtype. A per-epoch cache holds every
    training seed (one folder each), so `seed` is not part of its key."""
    if _exact(split):
        mode: dict[str, object] = {"views": 1}
    elif views is None:
        mode = {"views": "per-epoch", "protocol": PROTOCOL}
    else:
        mode = {"views": views, "seed": seed}
    canonical = json.dumps({"source": source_key, "data": data_key, "transform": repr(split.transform),
                            "dtype": dtype, "n": len(split), **mode}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_or_build(
    root: str | Path, source_key: str, data_key: str, model: nn.Module, split: Split,
    *, views: int = 4, seed: int = 0, dtype: CacheDtype = "float16",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One source's exact or bank cache: (V, N, C) logits and the views' (V, N, P) parameters
    (None when exact), memory-mapped from `root/<key>/`; computed first if absent, by one
    process only. V = 1 for an exact split, else `views`."""
    if not replayable(split):
        raise CacheUnavailableError("the training split cannot replay its augmentation views")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")

    def fill() -> dict[str, torch.Tensor | None]:
        if _exact(split):
            return {"logits": compute_logits(model, split, None, dtype)[None], "view_params": None}
        bank = torch.stack([split.transform.draw(len(split), torch.Generator().manual_seed(seed * 1_000_003 + v))
                            for v in range(views)])
        logits = torch.stack([compute_logits(model, split, bank[v], dtype) for v in range(views)])
        return {"logits": logits, "view_params": bank}

    stored = _load_or_fill(Path(root) / cache_key(source_key, data_key, split, views, seed, dtype) / CACHE_FILE, fill)
    return stored["logits"], stored["view_params"]


class SourceLogitCache:
    """Cached logits of a stage's frozen sources on one training split (module docstring: modes).

    `batches(batch_size, seed, epoch)` replaces `training_batches` in `fit`: the same order,
    the views of the mode, and each source's logits of exactly those views.
    """

    def __init__(
        self, split: Split, sources: Sequence[tuple[Path, nn.Module]], dtype: CacheDtype,
        fixed: list[torch.Tensor] | None = None, bank: torch.Tensor | None = None,
    ) -> None:
        self.split, self.sources, self.dtype = split, list(sources), dtype
        self.device = split.labels.device
        #: Exact or bank mode: each source's (V, N, C) logits on the split's device; None: per epoch.
        self.fixed = None if fixed is None else [logits.to(self.device) for logits in fixed]
        self.view_params = bank  # (K, N, P) on the CPU in bank mode, else None

    @property
    def views(self) -> int | None:
        """Views stored per image: 1 (exact), K (bank) or None (one per image per epoch)."""
        return None if self.fixed is None else len(self.fixed[0])

    def epoch_logits(self, seed: int, epoch: int) -> list[torch.Tensor]:
        """Per epoch mode: each source's (N, C) logits on the views of `epoch_draws(seed, epoch)`,
        memory-mapped from disk; computed first (by this process, once) where absent."""
        if self.fixed is not None:
            raise ValueError("epoch_logits is for a per-epoch cache (views=None)")
        views = epoch_draws(self.split, seed, epoch).views
        logits = []
        for directory, model in self.sources:
            def fill(model: nn.Module = model) -> dict[str, torch.Tensor | None]:
                return {"logits": compute_logits(model, self.split, views, self.dtype)}

            stored = _load_or_fill(directory / f"seed{seed}" / f"epoch{epoch}.pt", fill)
            logits.append(stored["logits"].to(self.device))
        return logits

    def batches(
        self, batch_size: int, seed: int, epoch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """Training batches (images, labels, each source's logits (n, C) in float32) of epoch
        `epoch` of seed `seed`, in `epoch_draws` order. Exact and per epoch modes show the live
        protocol's views (the same images as without the cache); bank mode shows each image in
        one of its K stored views, picked per (seed, epoch)."""
        for images, labels, logits, _index in self.indexed_batches(batch_size, seed, epoch):
            yield images, labels, logits

    def indexed_batches(
        self, batch_size: int, seed: int, epoch: int, shard: Shard | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]]:
        """`batches` with each batch's dataset indices into the split, (n,) int64 on its device:
        (images, labels, logits, index); with `shard`, only the rows of each batch it keeps."""
        split = self.split
        draws = epoch_draws(split, seed, epoch)
        if self.fixed is None:  # per epoch
            views, logits = draws.views, self.epoch_logits(seed, epoch)
        elif self.view_params is None:  # exact
            views, logits = None, [fixed[0] for fixed in self.fixed]
        else:  # bank: gather each image's chosen view once per epoch, (N, C) per source
            chosen = torch.randint(len(self.view_params), (len(split),),
                                   generator=epoch_generator(seed, epoch, _BANK_STREAM))
            images = torch.arange(len(split))
            views = self.view_params[chosen, images]
            chosen, images = chosen.to(self.device), images.to(self.device)
            logits = [fixed[chosen, images] for fixed in self.fixed]
        for batch, labels, index in _protocol_batches(split, batch_size, draws.order, views, shard):
            yield batch, labels, [source[index].float() for source in logits], index

    def disk_bytes(self) -> int:
        """Bytes the cache files of these sources take on disk (every seed and epoch so far)."""
        return sum(path.stat().st_size for directory, _ in self.sources for path in directory.rglob("*.pt"))


def build_cache(
    root: str | Path, sources: Sequence[tuple[str, nn.Module]], data_key: str, split: Split,
    *, views: int | None = None, seed: int = 0, dtype: CacheDtype = "float16",
) -> SourceLogitCache:
    """The cache of several sources `(stage key, model)` on one training split, in `root`.

    `views=None` (default): the live protocol, one view per image per epoch, computed lazily
    per (training seed, epoch) as trials reach it. `views=K`: a bank of K views per image
    drawn with `seed`, computed now (an approximation: module docstring). Without random
    augmentation both are the exact single view, computed now. Raises CacheUnavailableError
    when the split cannot replay views, ValueError when `views < 1`.
    """
    if not replayable(split):
        raise CacheUnavailableError("the training split cannot replay its augmentation views")
    if views is not None and views < 1:
        raise ValueError(f"views must be >= 1 or None, got {views}")
    directories = [(Path(root) / cache_key(key, data_key, split, views, seed, dtype), model) for key, model in sources]
    if views is None and not _exact(split):
        return SourceLogitCache(split, directories, dtype)
    fixed, bank = [], None
    for key, model in sources:
        logits, bank = load_or_build(root, key, data_key, model, split, views=views or 1, seed=seed, dtype=dtype)
        fixed.append(logits)
    return SourceLogitCache(split, directories, dtype, fixed, bank)
