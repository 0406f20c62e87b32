"""torchvision classifiers rearranged into the staged interface (torchvision code is not edited).

Each model is built with `weights=None` (nothing is downloaded), optionally loaded from a
local state-dict file, then its own submodules are regrouped: stem, one stage per resolution
(features are split where a block downsamples), the final 1x1 conv of the mobile nets in
`neck` (like the zoo's MobileNetV2), and the classifier in the head.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from kd_core.checkpoints import CheckpointError, read_state_dict
from kd_core.models.base import Head, StagedModel
from kd_core.models.registry import MODELS


class SequentialHead(Head):
    """Pool, then torchvision's classifier: `mlp` (all but the last Linear), then `fc`.

    Keeps the dropout of mobilenet/efficientnet, and mobilenet_v3's hidden Linear + Hardswish,
    which run after pooling and so cannot be part of the pre-head feature map.
    """

    def __init__(self, classifier: nn.Sequential) -> None:
        fc = classifier[-1]
        super().__init__(fc.in_features, fc.out_features)
        self.mlp = nn.Sequential(*classifier[:-1])
        self.fc = fc

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mlp(torch.flatten(self.pool(feature_map), 1)))


def _out_channels(module: nn.Module) -> int:
    """Output channels of a block sequence: those of its last conv."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
    )
    setattr(parent, attr, new)


def _load_weights(model: nn.Module, path: str, first_conv: str, classifier: str) -> None:
    """Load a state dict; the first conv and classifier are skipped where their shapes differ.
    Raises CheckpointError (a ValueError) naming the file when it is missing, damaged, holds
    pickled objects (read with `weights_only=True`: nothing runs) or does not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    skipped = [
        prefix
        for prefix in (first_conv, classifier)
        if f"{prefix}.weight" in state and state[f"{prefix}.weight"].shape != own[f"{prefix}.weight"].shape
    ]
    state = {k: v for k, v in state.items() if not any(k.startswith(prefix + ".") for prefix in skipped)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch
        first = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"weights file {path}: does not fit the architecture: {first}") from None
    missing = [k for k in missing if not any(k.startswith(prefix + ".") for prefix in skipped)]
    if missing or unexpected:
        raise CheckpointError(f"weights file {path}: does not fit the architecture: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _prepare(model: nn.Module, in_channels: int, weights_path: str | None, first_conv: str, classifier: str) -> None:
    _replace_first_conv(model, first_conv, in_channels)
    if weights_path is not None:
        _load_weights(model, weights_path, first_conv, classifier)


def _builder(name: str) -> Callable[..., nn.Module]:
    """torchvision.models.<name>, imported on first use (torchvision takes seconds to import)."""
    import torchvision.models

    return getattr(torchvision.models, name)


def _resnet(name: str, num_classes: int, in_channels: int, weights_path: str | None) -> StagedModel:
    model = _builder(name)(weights=None, num_classes=num_classes)
    _prepare(model, in_channels, weights_path, "conv1", "fc")
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    head = Head(model.fc.in_features, num_classes)
    head.fc = model.fc  # the (possibly loaded) torchvision classifier
    return StagedModel(stem, stages, head, [_out_channels(s) for s in stages])


def _mobile(
    name: str,
    splits: list[int],
    num_classes: int,
    in_channels: int,
    weights_path: str | None,
) -> StagedModel:
    """`features[0]` is the stem and `features[-1]` (the final 1x1 conv) the neck; a stage
    starts at each index in `splits` (downsampling blocks, but for the first)."""
    model = _builder(name)(weights=None, num_classes=num_classes)
    _prepare(model, in_channels, weights_path, "features.0.0", f"classifier.{len(model.classifier) - 1}")
    features = model.features
    bounds = [*splits, len(features) - 1]
    stages = [nn.Sequential(*features[start:end]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    channels = [_out_channels(s) for s in stages]
    return StagedModel(features[0], stages, SequentialHead(model.classifier), channels, neck=features[-1])


_RESNETS = ("resnet18", "resnet34", "resnet50")  # torchvision.models builders
# builder -> indices of `features` where a stage starts
_MOBILE: dict[str, list[int]] = {
    "mobilenet_v2": [1, 2, 4, 7, 14],
    "mobilenet_v3_small": [1, 2, 4, 9],
    "mobilenet_v3_large": [1, 2, 4, 7, 13],
    "efficientnet_b0": [1, 2, 3, 4, 6],
}


def _register(name: str, build: Callable[[int, int, str | None], StagedModel]) -> None:
    # a real function (not a partial) per name, so the spec validator can read its type hints
    def factory(num_classes: int, in_channels: int = 3, weights_path: str | None = None) -> StagedModel:
        return build(num_classes, in_channels, weights_path)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"torchvision {name.removeprefix('tv_')}; `weights_path`: a local state dict to load."
    MODELS.register(name)(factory)


for _name in _RESNETS:
    _register(f"tv_{_name}", partial(_resnet, _name))
for _name, _splits in _MOBILE.items():
    _register(f"tv_{_name}", partial(_mobile, _name, _splits))
