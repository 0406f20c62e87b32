"""The CIFAR KD benchmark zoo and the torchvision models behind the staged interface."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import torchvision

from kd_core.models import MODELS, build_model

ZOO = [name for name in MODELS.names() if name != "convnet"]

# The CIFAR zoo as RepDistiller defines it (HobbitLong/RepDistiller models/*.py, which SimKD and
# mdistiller copy): exact parameter counts with 100 classes and every stage's output shape
# (C, H, W) for a 3x32x32 input, computed from the reference definitions. docs/spec.md has the table.
REFERENCE: dict[str, tuple[int, list[tuple[int, int, int]]]] = {
    "resnet8": (83_892, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet14": (181_108, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet20": (278_324, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet32": (472_756, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet44": (667_188, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet56": (861_620, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet110": (1_736_564, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "resnet8x4": (1_233_540, [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
    "resnet32x4": (7_433_860, [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
    "resnet50": (23_705_252, [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]),
    "wrn_16_1": (180_916, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "wrn_16_2": (703_284, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "wrn_40_1": (569_780, [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    "wrn_40_2": (2_255_156, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
    "vgg8": (3_965_028, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
    "vgg11": (9_277_284, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
    "vgg13": (9_462_180, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
    "vgg16": (14_774_436, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
    "vgg19": (20_086_692, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
    "mobilenetv2": (2_353_060, [(24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2)]),
    "mobilenetv2_0_5": (812_836, [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)]),
    "shufflenetv1": (949_258, [(240, 16, 16), (480, 8, 8), (960, 4, 4)]),
    "shufflenetv2": (1_355_528, [(116, 16, 16), (232, 8, 8), (464, 4, 4)]),
    "shufflenetv2_1_5": (2_580_548, [(176, 16, 16), (352, 8, 8), (704, 4, 4)]),
}
# the reference ShuffleV2's other net sizes (its configs dict; 2.0 opens with 224 channels)
SHUFFLENETV2_SIZES = {0.2: 220_388, 0.3: 235_588, 0.5: 443_716, 1.0: 1_355_528, 1.5: 2_580_548, 2.0: 5_521_860}
# how the reference initialises each family's Linear layer (kd_core/models/initialization.py)
LINEAR_INIT = {"resnet": "pytorch", "wrn": "zero_bias", "vgg": "normal", "mobilenetv2": "normal"}


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


def _count(name: str, args: dict | None = None) -> int:
    with torch.device("meta"):  # counts only: no memory, no init
        model = build_model(name, num_classes=100, in_channels=3, args=args)
    return sum(p.numel() for p in model.parameters())


def test_the_reference_table_covers_the_cifar_zoo() -> None:
    cifar_zoo = {name for name in ZOO if MODELS.get(name).__module__.split(".")[-1] in
                 {"cifar_resnet", "wrn", "vgg", "mobilenetv2", "shufflenet"}}
    assert cifar_zoo == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_counts_and_stage_shapes_equal_the_reference(name: str) -> None:
    params, shapes = REFERENCE[name]
    assert _count(name) == params
    with torch.device("meta"):
        model = build_model(name, num_classes=100, in_channels=3).eval()
        outputs = model.stage_outputs(torch.empty(2, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outputs] == shapes
    assert model.stage_channels == [shape[0] for shape in shapes]


@pytest.mark.parametrize(("net_size", "params"), sorted(SHUFFLENETV2_SIZES.items()))
def test_shufflenetv2_net_sizes_equal_the_reference(net_size: float, params: int) -> None:
    assert _count("shufflenetv2", {"net_size": net_size}) == params


@pytest.mark.parametrize("name", ["shufflenetv1", "shufflenetv2", "shufflenetv2_1_5"])
def test_shufflenet_stems_are_1x1_convs(name: str) -> None:
    with torch.device("meta"):
        stem = build_model(name, num_classes=100, in_channels=3).stem
    (conv,) = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.out_channels == 24


def _family(name: str) -> str:
    return next(family for family in ("resnet", "wrn", "vgg", "mobilenetv2", "shufflenet") if name.startswith(family))


def _fan(weight: torch.Tensor) -> tuple[int, int]:
    receptive = weight[0, 0].numel()
    return weight.shape[1] * receptive, weight.shape[0] * receptive  # fan_in, fan_out


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_initialisation(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=100, in_channels=3)
    modules = list(model.modules())
    convs = [m for m in modules if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in modules if isinstance(m, torch.nn.BatchNorm2d)]
    (linear,) = [m for m in modules if isinstance(m, torch.nn.Linear)]
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any() for bn in bns)
    if _family(name) == "shufflenet":  # the reference sets none: PyTorch's default, bounded by 1/sqrt(fan_in)
        assert all(c.weight.abs().max() <= _fan(c.weight)[0] ** -0.5 for c in convs)
        assert linear.bias.any()
        return
    # every conv from N(0, 2 / (k*k*out_channels)): scaled to unit variance, all weights together
    scaled = torch.cat([(c.weight / (2 / _fan(c.weight)[1]) ** 0.5).flatten() for c in convs])
    assert scaled.mean().abs() < 0.02 and scaled.std().item() == pytest.approx(1.0, abs=0.02)
    assert all(c.bias is None or not c.bias.any() for c in convs)
    rule = LINEAR_INIT[_family(name)]
    bound = linear.in_features ** -0.5  # PyTorch's default: uniform(-bound, bound)
    if rule == "normal":
        assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05) and not linear.bias.any()
    else:
        assert linear.weight.abs().max() <= bound and linear.weight.std() > 0.5 * bound / 3**0.5
        assert (rule == "zero_bias") == (not linear.bias.any())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2_0_5"])
def test_pytorch_initialisation_is_an_option(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=100, in_channels=3, args={"init": "pytorch"})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.abs().max() <= _fan(c.weight)[0] ** -0.5 for c in convs)  # kaiming_uniform(a=sqrt(5))
    assert model.head.fc.bias.any()
    with pytest.raises(ValueError, match="init must be one of reference, pytorch"):
        build_model(name, num_classes=100, in_channels=3, args={"init": "xavier"})


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
