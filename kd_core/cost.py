"""What a deployed model costs: parameters, floating-point operations per image, and latency.

`measure_costs` gives every cost a sweep records (as `cost_<name>` metrics, units in `COST_UNITS`),
so any of them can be a sweep objective (`sweep.objectives: [accuracy, <name>]`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

COSTS = ("params", "flops", "latency")
COST_UNITS = {"params": "parameters", "flops": "FLOPs per image", "latency": "ms per batch (median)"}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flop_count(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on one image (PyTorch's counter: a multiply-add is 2)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example[:1])
    model.train(was_training)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class LatencyProtocol:
    """How latency is measured, the same way for every model: `warmup` untimed forward passes,
    then the median of `repeats` timed ones, each on a batch of `batch_size` images."""

    batch_size: int = 1
    warmup: int = 10
    repeats: int = 50


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, protocol: LatencyProtocol = LatencyProtocol()) -> float:
    """Median wall time in milliseconds of one eval-mode forward pass of `model` on
    `protocol.batch_size` copies of `example[0]` (example: (N, C, H, W), N >= 1), on the device
    where `example` and `model` are, with the process's current torch thread count (a sweep's
    workers fix it: one thread per CPU of a trial). CUDA work is synchronised before each clock
    read, so the time is the kernels', not their launch."""
    was_training = model.training
    model.eval()
    batch = example[:1].expand(protocol.batch_size, *example.shape[1:]).contiguous()

    def sync() -> None:
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)

    for _ in range(protocol.warmup):
        model(batch)
    sync()
    seconds = []
    for _ in range(protocol.repeats):
        start = time.perf_counter()
        model(batch)
        sync()
        seconds.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(seconds) * 1000.0


def measure_costs(model: nn.Module, example: torch.Tensor, latency: LatencyProtocol = LatencyProtocol(),
                  ) -> dict[str, float]:
    """Every cost of `model` as `{"cost_params", "cost_flops", "cost_latency"}` (units: COST_UNITS);
    `example` (N, C, H, W) is a model input on the device the latency is measured on."""
    return {"cost_params": float(parameter_count(model)), "cost_flops": float(flop_count(model, example)),
            "cost_latency": latency_ms(model, example, latency)}
