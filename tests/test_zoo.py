"""The CIFAR KD benchmark zoo and the torchvision models behind the staged interface."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import torchvision

from kd_core.models import MODELS, build_model

ZOO = [name for name in MODELS.names() if name != "convnet"]

# parameters (millions) with 100 classes, as reported for the CRD/RepDistiller zoo
PARAMS_M = {
    "resnet8": 0.084, "resnet20": 0.278, "resnet32": 0.473, "resnet56": 0.862, "resnet110": 1.737,
    "resnet8x4": 1.234, "resnet32x4": 7.434, "wrn_16_2": 0.703, "wrn_40_1": 0.570, "wrn_40_2": 2.255,
    "vgg8": 3.965, "vgg13": 9.462, "mobilenetv2_0_5": 0.813, "shufflenetv1": 0.949, "shufflenetv2": 1.356,
}


def test_the_zoo_is_registered() -> None:
    expected = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
        "resnet32x4", "resnet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
        "vgg16", "vgg19", "mobilenetv2", "mobilenetv2_0_5", "shufflenetv1", "shufflenetv2", "shufflenetv2_1_5",
        "tv_resnet18", "tv_resnet34", "tv_resnet50", "tv_mobilenet_v2", "tv_mobilenet_v3_small",
        "tv_mobilenet_v3_large", "tv_efficientnet_b0",
    }
    assert expected <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_factory_type_hints_resolve(name: str) -> None:
    # the spec validator coerces user arguments through these hints
    hints = typing.get_type_hints(MODELS.get(name))
    assert hints["num_classes"] is int and hints["in_channels"] is int


@pytest.mark.parametrize("name", ZOO)
def test_builds_trains_and_exposes_stages(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=100, in_channels=3)
    x = torch.randn(2, 3, 32, 32)

    model.train()
    logits = model(x)
    assert logits.shape == (2, 100)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "a parameter is not on the forward path"

    model.eval()
    with torch.no_grad():
        outputs = model.stage_outputs(x)
        assert len(outputs) == len(model.stages) == len(model.stage_channels)
        assert [o.shape[1] for o in outputs] == model.stage_channels
        # one stage per resolution; the zoo's VGG does not pool before its last block at 32x32
        sizes = [o.shape[-1] for o in outputs]
        halvings = sizes[:-1] if name.startswith("vgg") else sizes
        assert all(a == 2 * b for a, b in zip(halvings, halvings[1:])), sizes
        torch.testing.assert_close(model.head(model.prehead(x)), model(x))


@pytest.mark.parametrize(("name", "millions"), sorted(PARAMS_M.items()))
def test_parameter_counts_match_the_zoo(name: str, millions: float) -> None:
    with torch.device("meta"):  # counts only: no memory, no init
        model = build_model(name, num_classes=100, in_channels=3)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize(
    "name",
    ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2_0_5", "shufflenetv1", "shufflenetv2",
     "tv_resnet18", "tv_mobilenet_v3_small"],
)
def test_other_input_channels(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_wide_resnet_prehead_is_the_final_activation() -> None:
    model = build_model("wrn_16_2", num_classes=100, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        prehead, last_stage = model.prehead(x), model.stage_outputs(x)[-1]
    assert (prehead >= 0).all()
    assert (last_stage < 0).any()  # a raw residual sum, before the neck's BN + ReLU
    assert not torch.allclose(prehead, last_stage)


@pytest.mark.parametrize(("args", "message"), [
    (("mobilenetv2", {"width_mult": 0.0}), "width_mult"),
    (("shufflenetv2", {"net_size": 0.7}), "net_size"),
])
def test_invalid_arguments_are_rejected(args: tuple[str, dict], message: str) -> None:
    name, values = args
    with pytest.raises(ValueError, match=message):
        build_model(name, num_classes=10, in_channels=3, args=values)


def _randomized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # random BN statistics too, so buffers are checked as well as weights
    state = model.state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def test_torchvision_resnet_loads_a_local_backbone(tmp_path: Path) -> None:
    saved = _randomized_state(torchvision.models.resnet18(weights=None, num_classes=7))
    path = tmp_path / "resnet18.pt"
    torch.save(saved, path)

    model = build_model("tv_resnet18", num_classes=10, in_channels=3, args={"weights_path": str(path)})
    state = model.state_dict()
    renamed = {"conv1": "stem.0", "bn1": "stem.1", **{f"layer{i + 1}": f"stages.{i}" for i in range(4)}}
    for key, value in saved.items():
        top, rest = key.split(".", 1)
        if top != "fc":
            torch.testing.assert_close(state[f"{renamed[top]}.{rest}"], value, msg=key)
    assert model.head.fc.weight.shape == (10, 512)  # a new classifier: the saved one has 7 classes

    same_classes = build_model("tv_resnet18", num_classes=7, in_channels=3, args={"weights_path": str(path)})
    torch.testing.assert_close(same_classes.head.fc.weight, saved["fc.weight"])


def test_torchvision_mobilenet_v3_keeps_its_hidden_classifier_layer(tmp_path: Path) -> None:
    saved = _randomized_state(torchvision.models.mobilenet_v3_small(weights=None, num_classes=5))
    path = tmp_path / "mnv3.pt"
    torch.save(saved, path)

    model = build_model("tv_mobilenet_v3_small", num_classes=10, in_channels=3, args={"weights_path": str(path)})
    torch.testing.assert_close(model.stem[0].weight, saved["features.0.0.weight"])
    torch.testing.assert_close(model.head.mlp[0].weight, saved["classifier.0.weight"])
    assert model.head.fc.weight.shape == (10, 1024)


def test_a_weights_file_that_does_not_fit_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mnv3.pt"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        build_model("tv_resnet18", num_classes=10, in_channels=3, args={"weights_path": str(path)})
