"""Distillers: named terms equal the loss functions; frozen sources stay frozen."""

from __future__ import annotations

import copy

import pytest
import torch

from kd_core.distillers import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.train import fit


def small(width: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("convnet", 10, 1, {"width": width, "depth": 1})


def test_registry_lists_methods() -> None:
    assert {"ce", "kd"} <= set(DISTILLERS.names())
    with pytest.raises(ValueError, match="unknown method 'fitnet'"):
        DISTILLERS.get("fitnet")


def test_kd_terms_equal_the_loss_functions() -> None:
    student, teacher = small(4), small(8, seed=1)
    kd = DISTILLERS.get("kd")
    distiller = kd(student, [teacher], kd.make_params({"T": 3.0, "kl_reduction": "mean"}))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    distiller.train()
    logits, terms = distiller.forward_train(x, y)
    assert set(terms) == {"ce", "kd"}
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(x)
    torch.testing.assert_close(terms["ce"], cross_entropy(logits, y))
    torch.testing.assert_close(terms["kd"], kd_loss(logits, teacher_logits, 3.0, "mean"))
    assert distiller.weights == {"ce": 0.1, "kd": 0.9}


def test_teacher_gets_no_gradient_and_stays_in_eval_mode() -> None:
    student, teacher = small(4), small(8, seed=1)
    kd = DISTILLERS.get("kd")
    distiller = kd(student, [teacher], kd.make_params())
    distiller.train()
    assert not teacher.training
    _, terms = distiller.forward_train(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    (terms["ce"] + terms["kd"]).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_training_leaves_teacher_weights_and_bn_buffers_unchanged(digits) -> None:
    student, teacher = small(4), small(8, seed=1)
    before = copy.deepcopy(teacher.state_dict())
    kd = DISTILLERS.get("kd")
    fit(kd(student, [teacher], kd.make_params()), digits, build_recipe("digits", {"epochs": 1}))
    after = teacher.state_dict()
    assert any("running_mean" in k for k in before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_param_errors_name_the_parameter() -> None:
    kd = DISTILLERS.get("kd")
    with pytest.raises(ValueError, match="unknown parameter 'alpha'"):
        kd.make_params({"alpha": 0.5})
    with pytest.raises(ValueError, match="T must be > 0"):
        kd.make_params({"T": 0})
    with pytest.raises(ValueError, match="w_kd must be >= 0"):
        kd.make_params({"w_kd": -1})


def test_source_count_is_checked() -> None:
    kd = DISTILLERS.get("kd")
    with pytest.raises(ValueError, match="KDDistiller learns from exactly 1 source, got 0"):
        kd(small(4), [], kd.make_params())
