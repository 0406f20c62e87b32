"""timm classifiers behind the staged interface: `arch: {name: timm, args: {model: resnet18}}`.

The model is built by timm (`pretrained=False`: nothing is downloaded; `pretrained_file` loads a
local state dict). Its stages come from timm's own feature API: `feature_info` names the
module after which each feature level ends. The model's modules, in order (containers that
hold a feature module are opened), are cut there: the stem ends at the stride-2 feature (or
before the first feature), one stage per later feature level, whatever runs before pooling
after the last feature (EfficientNet's conv_head, ConvNeXt's norm_pre) is the neck, and
everything from the global pool on (`global_pool`/`head` onwards) is the head. The split is
verified once: in eval mode head(neck(stages(stem(x)))) must equal timm's own forward, else
the model is refused with a ValueError (a family kdsweep cannot stage).

Tested families: ResNet/ResNet-D, EfficientNet, MobileNetV3, RegNet, ConvNeXt.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from kd_core.checkpoints import read_state_dict
from kd_core.models.base import StagedModel
from kd_core.models.registry import MODELS

HEAD_STARTS = ("global_pool", "head")  # the first top-level module of the classifier part


class TimmHead(nn.Module):
    """timm's classifier part (pooling, any post-pool layers, the final Linear) as one module."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.layers = _sequential(modules)

    @property
    def fc(self) -> nn.Linear:
        """The final Linear (StagedModel reads the class count from it)."""
        linear = [m for m in self.layers.modules() if isinstance(m, nn.Linear)]
        return linear[-1]

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.layers(feature_map)


def _flatten(model: nn.Module, feature_names: set[str]) -> list[tuple[str, nn.Module]]:
    """Top-level modules in order, opening any container that holds a feature module."""
    flat: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if any(f.startswith(full + ".") for f in feature_names):
                visit(full + ".", child)
            else:
                flat.append((full, child))

    visit("", model)
    return flat


def _sequential(modules: list[tuple[str, nn.Module]]) -> nn.Module:
    if not modules:
        return nn.Identity()
    return nn.Sequential(OrderedDict((name.replace(".", "_"), module) for name, module in modules))


def stage_timm_model(model: nn.Module, in_channels: int, image_size: int = 32) -> StagedModel:
    """Rearrange a timm classifier into stem / stages / neck / head (module objects are reused,
    not copied). Raises ValueError when the split does not reproduce timm's forward."""
    features = list(model.feature_info)
    names = {f["module"] for f in features}
    flat = _flatten(model, names)
    head_at = next((i for i, (name, _) in enumerate(flat) if name.split(".")[0] in HEAD_STARTS), None)
    if head_at is None:
        raise ValueError(f"timm model {type(model).__name__}: no global_pool/head module to split off")
    body, head = flat[:head_at], flat[head_at:]
    cuts = [i for i, (name, _) in enumerate(body) if name in names]
    if len(cuts) != len(features):
        raise ValueError(f"timm model {type(model).__name__}: feature modules {sorted(names)} are not all in order")
    first = features[0]["reduction"] <= 2  # a stride-2 feature level closes the stem
    stem_end = cuts[0] + 1 if first else cuts[0]
    bounds = cuts[1:] if first else cuts
    stages, start = [], stem_end
    for end in bounds:
        stages.append(_sequential(body[start:end + 1]))
        start = end + 1
    channels = [f["num_chs"] for f in (features[1:] if first else features)]
    staged = StagedModel(_sequential(body[:stem_end]), stages, TimmHead(head), channels,
                         neck=_sequential(body[start:]))
    _verify(model, staged, in_channels, image_size)
    return staged


@torch.no_grad()
def _verify(model: nn.Module, staged: StagedModel, in_channels: int, image_size: int) -> None:
    was_training = model.training
    model.eval()
    x = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        same = torch.allclose(model(x), staged(x), rtol=1e-4, atol=1e-5)
    except Exception as error:  # e.g. a ViT that takes one input size only
        raise ValueError(f"timm model {type(model).__name__} cannot be staged: {error}") from None
    finally:
        model.train(was_training)
    if not same:
        raise ValueError(f"timm model {type(model).__name__}: its modules in order do not reproduce its forward, "
                         "so it cannot be split into stages")


def _load_pretrained(model: nn.Module, path: str, in_channels: int) -> None:
    """A local timm state dict; a classifier of another class count stays new, and a first conv
    of another channel count is adapted (timm's `adapt_input_conv`)."""
    import timm.models

    state = read_state_dict(path)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "")
    first_conv = model.pretrained_cfg.get("first_conv", "")
    for key in list(state):
        if key in own and state[key].shape != own[key].shape:
            if first_conv and key == f"{first_conv}.weight":
                state[key] = timm.models.adapt_input_conv(in_channels, state[key])
            elif classifier and key.startswith(classifier):
                del state[key]
    model.load_state_dict({**own, **state})


@MODELS.register("timm")
def timm_model(num_classes: int, in_channels: int, model: str = "resnet18", pretrained_file: str | None = None,
               drop_rate: float = 0.0, kwargs: dict[str, Any] | None = None) -> StagedModel:
    """A timm classifier `model` (any name `timm.list_models()` gives that stages cleanly),
    optionally loaded from `pretrained_file`; `kwargs` go to `timm.create_model`."""
    import timm  # imported when used: the command line starts faster

    if model not in timm.list_models():
        raise ValueError(f"unknown timm model {model!r} (see timm.list_models())")
    network = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                drop_rate=drop_rate, **(kwargs or {}))
    if pretrained_file:
        _load_pretrained(network, pretrained_file, in_channels)
    return stage_timm_model(network, in_channels)
