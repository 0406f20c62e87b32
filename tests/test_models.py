from __future__ import annotations

import pytest
import torch

from kd_core.models import MODELS, build_model, model_arg_names


@pytest.mark.parametrize(("width", "depth"), [(4, 1), (8, 2), (16, 3)])
def test_convnet_stages_and_head(width: int, depth: int) -> None:
    model = build_model("convnet", num_classes=10, in_channels=1, args={"width": width, "depth": depth})
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    outputs = model.stage_outputs(x)
    assert [o.shape[1] for o in outputs] == [width, 2 * width, 4 * width] == model.stage_channels
    assert [o.shape[-1] for o in outputs] == [8, 4, 2]
    logits = model(x)
    assert logits.shape == (5, 10)
    torch.testing.assert_close(model.head(model.prehead(x)), logits)
    torch.testing.assert_close(model.prehead(x), outputs[-1])


def test_depth_and_width_grow_the_model() -> None:
    def count(**args: int) -> int:
        return sum(p.numel() for p in build_model("convnet", 10, 1, args).parameters())

    assert count(width=4, depth=1) < count(width=4, depth=2) < count(width=8, depth=2)


def test_every_parameter_gets_a_gradient() -> None:
    model = build_model("convnet", 10, 1, {"width": 4, "depth": 2})
    model(torch.randn(3, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet9' \(known: .*convnet"):
        MODELS.get("resnet9")


def test_unknown_argument_is_named() -> None:
    assert model_arg_names("convnet") == ["width", "depth"]
    with pytest.raises(ValueError, match="no argument 'channels'"):
        build_model("convnet", 10, 1, {"channels": 3})


def test_invalid_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        build_model("convnet", 10, 1, {"width": 0})
