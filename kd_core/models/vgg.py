"""VGG with batch norm, CIFAR variant of the CRD/RepDistiller KD benchmark zoo.

Five conv blocks and a single Linear(512, num_classes) after global average pooling. Each
block is a stage. For 32x32 inputs the zoo max-pools after blocks 0-2 only (block 3 pools
only for 64x64 inputs), so stages 1-3 start with that max-pool: stage outputs are the
pre-pool maps the zoo taps as features (32, 16, 8, 4 and 4 pixels wide). Initialisation: the
reference's (convs N(0, 2/(k*k*out)), bias 0; BN 1/0; Linear N(0, 0.01^2), bias 0) or
`init="pytorch"` (initialization.py).
"""

from __future__ import annotations

from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.initialization import Init, initialize
from kd_core.models.registry import MODELS

# name -> conv widths of each of the five blocks
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg(config: list[list[int]], num_classes: int, in_channels: int = 3, init: Init = "reference") -> StagedModel:
    stages = []
    cin = in_channels
    for index, widths in enumerate(config):
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if 1 <= index <= 3 else []
        for width in widths:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        stages.append(nn.Sequential(*layers))
    channels = [widths[-1] for widths in config]
    model = StagedModel(nn.Identity(), stages, Head(channels[-1], num_classes), channels)
    return initialize(model, init, linear="normal")


def _register_vgg(name: str, config: list[list[int]]) -> None:
    # a real function (not a partial) per name, so the spec validator can read its type hints
    def factory(num_classes: int, in_channels: int = 3, init: Init = "reference") -> StagedModel:
        return vgg(config, num_classes, in_channels, init)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR {name.upper()} with batch norm."
    MODELS.register(name)(factory)


for _name, _config in _CONFIGS.items():
    _register_vgg(_name, _config)
