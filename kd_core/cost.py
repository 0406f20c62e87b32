"""What a deployed model costs: parameters and floating-point operations per image."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


COSTS = {"params": lambda model, example: parameter_count(model), "flops": flop_count}
