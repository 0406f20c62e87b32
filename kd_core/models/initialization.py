"""Weight initialisation of the CIFAR zoo: the reference code's (default) or PyTorch's.

Source: RepDistiller's models/*.py (HobbitLong/RepDistiller; SimKD and mdistiller copy them).
Every conv of its ResNets, WRNs, VGGs and MobileNetV2 is drawn from N(0, 2/n) with
n = k*k*out_channels: the ResNets call `kaiming_normal_(mode="fan_out", nonlinearity="relu")`,
WRN, VGG and MobileNetV2 write `normal_(0, sqrt(2/n))`, which is the same distribution (PyTorch's
fan_out is out_channels * k*k, depthwise convs included), so one rule serves all four. Conv
biases (only VGG has them) are zeroed, BatchNorm gets weight 1 and bias 0. The Linear layer is
where the families differ:

| family | Linear |
|---|---|
| ResNet (resnet8..resnet110, x4, resnet50) | PyTorch's default |
| WRN | PyTorch's default weight, bias 0 |
| VGG, MobileNetV2 | weight N(0, 0.01^2), bias 0 |
| ShuffleNet V1/V2 | the reference sets no init at all: PyTorch's default everywhere |

`init="pytorch"` keeps PyTorch's default everywhere (the zoo's only initialisation before this
option existed).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

#: A zoo factory's `init` argument: the reference code's initialisation or PyTorch's default.
Init = Literal["reference", "pytorch"]
#: How the reference initialises a family's Linear layers (table above).
LinearInit = Literal["pytorch", "zero_bias", "normal"]

INITS: tuple[str, ...] = ("reference", "pytorch")


def initialize(model: nn.Module, init: Init, linear: LinearInit = "pytorch") -> nn.Module:
    """Re-initialise `model` in place as the reference does (`init="reference"`), or leave
    PyTorch's default (`"pytorch"`); returns the model. Raises ValueError on another `init`."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "pytorch":
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear != "pytorch":
            if linear == "normal":
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return model
