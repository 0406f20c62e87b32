"""The core training function: one stage, epochs, eval each epoch, checkpoints, callbacks.

Pure PyTorch. The Tune trainable and plain scripts share it: per-epoch results reach the
caller through `callback(EpochReport)`, which may save a checkpoint with `report.save(dir)`.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kd_core.cache import SourceLogitCache, indexed_training_batches, replayable
from kd_core.data.base import Dataset, Split, SplitLike
from kd_core.distillers.base import Distiller, TrainingPosition
from kd_core.distributed import DataParallel, check_data_parallel
from kd_core.recipes import Recipe

CHECKPOINT_FILE = "train_state.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochReport:
    epoch: int  # 1-based, completed epochs
    metrics: dict[str, float]
    is_last: bool
    _state: Callable[[], dict[str, Any]] = field(repr=False)

    def save(self, directory: str | Path) -> Path:
        """Write a resumable checkpoint of the state after this epoch into `directory`."""
        path = Path(directory) / CHECKPOINT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self._state(), path)
        return path

    def frozen(self) -> EpochReport:
        """This report with a copy of the state as it is now (tensors cloned to the CPU), to be
        saved later, e.g. on another thread, while training goes on."""
        state = _copied(self._state())
        return EpochReport(self.epoch, dict(self.metrics), self.is_last, lambda: state)


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class FitResult:
    best_epoch: int
    metrics: dict[str, float]  # the last epoch's metrics, test included
    best_state: dict[str, torch.Tensor]  # deployable model at the best val epoch (empty on ranks > 0)
    epochs_run: int


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `EpochReport.save` without unpickling objects."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")


@torch.no_grad()
def evaluate(model: nn.Module, split: SplitLike, batch_size: int = 512) -> tuple[float, float]:
    """(mean CE loss, accuracy) of `model` on a split."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for images, labels in split.batches(batch_size):
        logits = model(images)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    model.train(was_training)
    return total_loss / len(split), correct / len(split)


def _trainable_state(distiller: Distiller) -> dict[str, torch.Tensor]:
    # Frozen sources are rebuilt from the stage store, not checkpointed per trial.
    return {k: v for k, v in distiller.state_dict().items() if not k.startswith("sources.")}


Precision = Literal["float32", "bfloat16", "float16"]


def weighted_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_t weights[t] * terms[t], a 0-dim tensor. Raises KeyError on a term without a weight
    (`Distiller.check_terms` reports it first, naming the method)."""
    return functools.reduce(operator.add, (weights[name] * term for name, term in terms.items()))


def steps_per_epoch(split: SplitLike, batch_size: int) -> int:
    """Training batches per epoch: `batches` keeps the last partial batch."""
    return math.ceil(len(split) / batch_size)


def fit(
    distiller: Distiller,
    data: Dataset,
    recipe: Recipe,
    *,
    seed: int = 0,
    callback: Callable[[EpochReport], None] | None = None,
    resume: dict[str, Any] | None = None,
    source_cache: SourceLogitCache | None = None,
    precision: Precision = "float32",
    channels_last: bool = False,
    data_parallel: DataParallel | None = None,
) -> FitResult:
    """Train `distiller` for `recipe.epochs` epochs on `data` (already on its device).

    Each epoch: one pass over train, then val; the best epoch is the highest val accuracy
    (ties: lower val loss). The last epoch also reports test metrics of the best-epoch
    and last-epoch models. `resume` is a checkpoint from `load_checkpoint`. Each epoch's
    shuffle and augmentation are drawn from (`seed`, epoch) alone (`kd_core.cache.epoch_draws`),
    so every method trains on the same batches for the same seed. With `source_cache`, the
    distiller reads the sources' cached logits of those batches instead of running them (a
    bank cache, `views=K`, shows its stored views instead). `precision` (autocast) and
    `channels_last` apply on CUDA only; on the CPU training stays float32. Every step passes
    its `TrainingPosition` to `forward_train` and checks the returned term names against the
    weight fields (raises `ContractError` on a mismatch, naming the method). Every step also
    sets `distiller.sample_index`, the batch's dataset indices into `data.train`; for a method
    with `needs_sample_index`, `fit` first calls `distiller.bind_training_set(labels)` (before
    the optimizer and the resumed state) and raises ValueError, naming the method, when the
    training split cannot give the indices.

    With `data_parallel`, this process is one rank of a DDP group (`kd_core.distributed`): it
    trains on its rows of each of the same global batches, gradients are averaged over the
    ranks, and the train metrics are summed over them (equal to a single process's). Only rank
    0 evaluates, keeps the best state and calls `callback`; other ranks return the train
    metrics alone. Every rank passes the same `resume`. Raises ValueError for a method that
    cannot train data-parallel (`check_data_parallel`) or a batch some rank gets no rows of.
    """
    if data_parallel is not None:
        check_data_parallel(type(distiller))
        data_parallel.check_batches(len(data.train), recipe.batch_size)
    if type(distiller).needs_sample_index:
        _bind_training_set(distiller, data.train)
    device = next(distiller.parameters()).device
    on_cuda = device.type == "cuda"
    autocast_dtype = getattr(torch, precision) if on_cuda and precision != "float32" else None
    memory_format = torch.channels_last if on_cuda and channels_last else torch.contiguous_format
    distiller.to(memory_format=memory_format)
    groups = [{"params": g["params"], "lr": recipe.lr * g.get("lr_scale", 1.0)}
              for g in distiller.param_groups()]
    optimizer = recipe.make_optimizer(groups)
    scheduler = recipe.make_scheduler(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    weights = distiller.weights
    deployable = distiller.deployable()
    epoch_steps = steps_per_epoch(data.train, recipe.batch_size)
    start_epoch = 0
    best: dict[str, Any] = {"epoch": 0, "val_acc": -1.0, "val_loss": math.inf, "state": None}

    if resume is not None:
        distiller.load_state_dict(resume["model"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume.get("scaler", {}))
        torch.set_rng_state(resume["rng"])
        start_epoch = int(resume["epoch"])
        best = dict(resume["best"])

    # Under DDP the forward goes through its wrapper (built after the resumed state: it
    # broadcasts rank 0's weights).
    forward_train = distiller.forward_train if data_parallel is None else data_parallel.wrap(distiller)
    shard = None if data_parallel is None else data_parallel.shard
    world = 1 if data_parallel is None else data_parallel.world_size
    evaluates = data_parallel is None or data_parallel.is_main

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        started = time.perf_counter()
        distiller.train()
        # The epoch's order and augmentation depend on (seed, epoch) only (kd_core.cache.epoch_draws):
        # every method, with the cache or without, trains on the same batches.
        if source_cache is not None:
            batches = source_cache.indexed_batches(recipe.batch_size, seed, epoch, shard)
        else:
            batches = ((images, labels, None, index) for images, labels, index
                       in indexed_training_batches(data.train, recipe.batch_size, seed, epoch, shard))
        # Loss sums stay on the device (one synchronisation per epoch, not per step); the
        # floats of `after_step` (a method's own optimizer) are summed on the host.
        loss_sums: torch.Tensor | None = None
        correct = torch.zeros((), device=device, dtype=torch.long)
        extra_sums: dict[str, float] = {}
        seen = 0
        for batch_index, (images, labels, cached, sample_index) in enumerate(batches):
            position = TrainingPosition(epoch, (epoch - 1) * epoch_steps + batch_index, epoch_steps, recipe.epochs)
            images = images.contiguous(memory_format=memory_format) if images.dim() == 4 else images
            distiller.cached_source_logits, distiller.sample_index = cached, sample_index
            n = len(labels)
            with torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits, terms = forward_train(images, labels, position)
                distiller.check_terms(terms)  # a term without a weight must fail, not count as 0
                loss = weighted_loss(terms, weights)
            optimizer.zero_grad(set_to_none=True)
            if world > 1:  # DDP divides the summed gradients by the ranks: weigh each by its rows
                whole = min(recipe.batch_size, len(data.train) - batch_index * recipe.batch_size)
                scaler.scale(loss * (n * world / whole)).backward()
            else:
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            logits = logits.detach()
            seen += n
            values = torch.stack([loss.detach(), *(term.detach() for term in terms.values())]).float()
            loss_sums = values * n if loss_sums is None else loss_sums.add_(values, alpha=n)
            correct += (logits.argmax(1) == labels).sum()
            for name, value in distiller.after_step(images, labels, logits).items():
                extra_sums[f"train_{name}"] = extra_sums.get(f"train_{name}", 0.0) + value * n
        distiller.cached_source_logits = distiller.sample_index = None
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if data_parallel is not None:  # every rank's sums: the epoch's metrics over the whole batch
            totals = data_parallel.sum(torch.cat([loss_sums.double(), correct.double().view(1),
                                                  torch.tensor([seen], dtype=torch.float64, device=device)]))
            loss_sums, correct, seen = totals[:-2], totals[-2], int(totals[-1].item())
        names = ["train_loss", *(f"train_loss_{name}" for name in terms)]
        metrics = {name: total / seen for name, total in zip(names, loss_sums.tolist(), strict=True)}
        metrics.update({name: total / seen for name, total in extra_sums.items()})
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(f"training loss is {metrics['train_loss']} at epoch {epoch}")
        if not evaluates:
            metrics.update(train_acc=correct.item() / seen, lr=lr, epoch_time=time.perf_counter() - started)
            continue
        val_loss, val_acc = evaluate(deployable, data.val)
        if val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"]):
            best = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                    "state": _copied(deployable.state_dict())}
        metrics.update(
            train_acc=correct.item() / seen, val_loss=val_loss, val_acc=val_acc,
            val_acc_best=best["val_acc"], val_loss_best=best["val_loss"],
            best_epoch=float(best["epoch"]), lr=lr,
            epoch_time=time.perf_counter() - started,
        )
        is_last = epoch == recipe.epochs
        if is_last:
            metrics.update(_test_metrics(deployable, best["state"], data.test))

        def state(epoch: int = epoch, best: dict[str, Any] = best) -> dict[str, Any]:
            return {
                "epoch": epoch, "model": _trainable_state(distiller),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "best": best,
            }

        if callback is not None:
            callback(EpochReport(epoch, dict(metrics), is_last, state))

    if not evaluates:
        return FitResult(0, metrics, {}, recipe.epochs - start_epoch)
    if best["state"] is None:  # resumed after the last epoch
        best["state"] = _copied(deployable.state_dict())
    return FitResult(int(best["epoch"]), metrics, best["state"], recipe.epochs - start_epoch)


def _bind_training_set(distiller: Distiller, train: SplitLike) -> None:
    """Give a method that reads sample indices its training set's labels, or refuse the split."""
    if not replayable(train):
        raise ValueError(
            f"{distiller.method_label()} needs each training image's dataset index (needs_sample_index), "
            f"but the training split ({type(train).__name__}) cannot give it: only a device-resident Split "
            "whose augmentation can replay views (kd_core.cache.replayable) yields indices, not a "
            "DataLoader-backed split"
        )
    assert isinstance(train, Split)
    distiller.bind_training_set(train.labels)


def _test_metrics(
    deployable: nn.Module, best_state: dict[str, torch.Tensor], test: SplitLike
) -> dict[str, float]:
    test_loss_last, test_acc_last = evaluate(deployable, test)
    best_model = copy.deepcopy(deployable)
    best_model.load_state_dict(best_state)
    test_loss, test_acc = evaluate(best_model, test)
    return {"test_acc": test_acc, "test_loss": test_loss,
            "test_acc_last": test_acc_last, "test_loss_last": test_loss_last}
