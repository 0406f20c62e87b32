"""timm classifiers behind the staged interface, and a KD sweep with timm teacher and student on
generated CIFAR-format data, weights from local files (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from kd_core.models import build_model
from sweeps.spec import SpecError, parse_spec
from tests.cifar_files import write_cifar
from tests.sweep_cli import run_spec

FAMILIES = ["resnet10t", "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "convnext_atto"]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_timm_model_is_staged_without_changing_its_function(name) -> None:
    import timm

    torch.manual_seed(0)
    staged = build_model("timm", 10, 3, {"model": name}).eval()
    outputs = staged.stage_outputs(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outputs] == staged.stage_channels
    assert [o.shape[-1] for o in outputs] == [8, 4, 2, 1]  # one stage per resolution after the stem
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(staged.head(staged.prehead(x)), staged(x))
    reference = timm.create_model(name, num_classes=10)
    reference.load_state_dict(dict(zip(reference.state_dict(), staged.state_dict().values(), strict=True)))
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), staged(x))  # the same weights, the same function


def test_pretrained_file_gets_a_new_head_and_adapted_input_channels(tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=1000)  # as an ImageNet file would be
    torch.save(source.state_dict(), tmp_path / "resnet10t.pt")
    staged = build_model("timm", 10, 1, {"model": "resnet10t", "pretrained_file": str(tmp_path / "resnet10t.pt")})
    layer = dict(staged.named_parameters())["stages.0.layer1.0.conv1.weight"]
    torch.testing.assert_close(layer, source.layer1[0].conv1.weight)
    assert staged.num_classes == 10 and staged.stem[0][0].in_channels == 1  # summed RGB filters


def test_unusable_timm_models_are_refused_at_validation(spec_dict) -> None:
    spec_dict["student"] = {"arch": {"name": "timm", "args": {"model": "vit_tiny_patch16_224"}}}
    with pytest.raises(SpecError, match="cannot be staged"):
        parse_spec(spec_dict)
    spec_dict["student"] = {"arch": {"name": "timm", "args": {"model": "no_such_net"}}}
    with pytest.raises(SpecError, match="unknown timm model 'no_such_net'"):
        parse_spec(spec_dict)


def test_timm_teacher_and_student_in_a_kd_sweep(tmp_path) -> None:
    import timm

    root = write_cifar(tmp_path / "data", num_classes=10, n_train=160, n_test=40)
    files = {}
    for name in ("regnetx_002", "mobilenetv3_small_050"):
        torch.manual_seed(0)
        files[name] = tmp_path / f"{name}.pt"
        torch.save(timm.create_model(name, num_classes=1000).state_dict(), files[name])
    spec = {
        "name": "timm_kd",
        "data": {"name": "cifar10", "root": str(root), "augment": "crop_flip", "val_fraction": 0.25},
        "teacher": {"arch": {"name": "timm", "args": {"model": "regnetx_002", "pretrained_file": str(files["regnetx_002"])}},
                    "recipe": {"name": "adam", "epochs": 1}},
        "student": {"arch": {"name": "timm", "args": {"model": "mobilenetv3_small_050",
                                                       "pretrained_file": str(files["mobilenetv3_small_050"])}}},
        "method": {"name": "kd"},
        "recipe": {"name": "adam", "epochs": 1},
        "search": {"method.name": {"choices": ["kd", "simkd"]}, "method.T": {"low": 1.0, "high": 8.0,
                                                                          "when": {"method.name": "kd"}}},
        "sweep": {"num_trials": 2, "max_concurrent": 2, "scheduler": {"type": "none"},
                  "initial_points": [{"method.name": "kd"}, {"method.name": "simkd"}]},
        "tracking": {"registered_model": "timm_student"},
    }
    swept = run_spec(tmp_path, spec, "timm")
    tracker, parent = swept["tracker"], swept["parent"]
    trials = tracker.children(parent.info.run_id, "trial")
    assert sorted(r.data.params["method"] for r in trials) == ["kd", "simkd"]
    assert all(r.info.status == "FINISHED" for r in trials)
    assert all("model=mobilenetv3_small_050" in r.data.params["arch"] for r in trials)
    (teacher,) = tracker.children(parent.info.run_id, "teacher")
    assert "model=regnetx_002" in teacher.data.params["arch"] and teacher.info.status == "FINISHED"
    assert (tmp_path / "kdsweep_storage/timm/export/student.onnx").is_file()
