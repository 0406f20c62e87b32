"""The Distiller contract: every registered method keeps it (plugins included), and `fit`
rejects loss terms and weight fields that differ instead of weighting a term by 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tests.plugins.faulty  # noqa: F401  (registers plugin methods before parametrization: they are checked too)
from kd_core.distillers import DISTILLERS, START, ContractError, Distiller, MethodParams
from kd_core.losses import cross_entropy
from kd_core.models import build_model
from kd_core.recipes import build_recipe
from kd_core.registry import Registry
from kd_core.testing import check_distiller, registered_methods
from kd_core.train import fit


@pytest.mark.parametrize("method", registered_methods())
def test_every_registered_method_keeps_the_contract(method: str) -> None:
    check_distiller(method)


def test_plugin_methods_are_among_the_checked() -> None:
    assert {"test_nan", "test_raise"} <= set(registered_methods())


# Methods that break the contract; not registered in DISTILLERS (errors then name the class).


@dataclasses.dataclass
class ExtraTermParams(MethodParams):
    w_ce: float = 1.0


class ExtraTermDistiller(Distiller):
    """Returns a term 'kd' that has no weight field."""

    Params = ExtraTermParams

    def forward_train(self, images, labels, position=START):
        logits = self.student(images)
        return logits, {"ce": cross_entropy(logits, labels), "kd": logits.square().mean()}


@dataclasses.dataclass
class UnusedWeightParams(MethodParams):
    w_ce: float = 1.0
    w_feat: float = 0.5


class UnusedWeightDistiller(Distiller):
    """Declares a weight w_feat but never returns a term 'feat'."""

    Params = UnusedWeightParams

    def forward_train(self, images, labels, position=START):
        logits = self.student(images)
        return logits, {"ce": cross_entropy(logits, labels)}


def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", 10, 1, {"width": 4, "depth": 1})


@pytest.mark.parametrize(("cls", "message"), [
    (ExtraTermDistiller,
     "method ExtraTermDistiller returned loss term 'kd' without a weight field 'w_kd' in ExtraTermParams"),
    (UnusedWeightDistiller,
     "method UnusedWeightDistiller: UnusedWeightParams declares 'w_feat' but forward_train never returns a term 'feat'"),
])
def test_fit_rejects_terms_and_weights_that_differ(cls, message, digits) -> None:
    distiller = cls(small(), [], cls.make_params())
    with pytest.raises(ContractError) as error:
        fit(distiller, digits, build_recipe("digits", {"epochs": 1}))
    assert str(error.value) == message


def test_contract_errors_name_a_registered_method_and_both_directions() -> None:
    ce = DISTILLERS.get("ce")
    distiller = ce(small(), [], ce.make_params())
    distiller.check_terms({"ce"})  # equal: no error
    with pytest.raises(ContractError) as error:
        distiller.check_terms({"t_ce", "r_ce"})
    assert str(error.value) == (
        "method 'ce' (CEDistiller) returned loss terms 'r_ce', 't_ce' without weight fields 'w_r_ce', 'w_t_ce' "
        "in CEParams; CEParams declares 'w_ce' but forward_train never returns a term 'ce'"
    )


def test_check_distiller_reports_broken_methods(monkeypatch) -> None:
    # Registered for this test only (monkeypatch removes them again), so no other test sees them.
    monkeypatch.setitem(DISTILLERS._entries, "contract_extra_term", ExtraTermDistiller)
    with pytest.raises(ContractError, match="method 'contract_extra_term' \\(ExtraTermDistiller\\) returned loss term 'kd'"):
        check_distiller("contract_extra_term")

    kd = DISTILLERS.get("kd")

    class AwakeKD(kd):
        """Puts its teacher back in training mode."""

        def train(self, mode: bool = True):
            torch.nn.Module.train(self, mode)
            return self

    monkeypatch.setitem(DISTILLERS._entries, "contract_awake", AwakeKD)
    with pytest.raises(AssertionError, match="method 'contract_awake' \\(AwakeKD\\): frozen sources \\[0\\] leave eval mode"):
        check_distiller("contract_awake")

    class LeakyKD(kd):
        """Lets gradients reach its teacher."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.sources.requires_grad_(True)

        def forward_train(self, images, labels, position=START):
            logits = self.student(images)
            teacher_logits = self.sources[0](images)
            return logits, {"ce": cross_entropy(logits, labels), "kd": (logits - teacher_logits).square().mean()}

    monkeypatch.setitem(DISTILLERS._entries, "contract_leaky", LeakyKD)
    with pytest.raises(AssertionError, match="method 'contract_leaky' \\(LeakyKD\\): gradients reach frozen source parameters sources.0."):
        check_distiller("contract_leaky")


def test_registry_name_of() -> None:
    registry: Registry = Registry("thing")
    registry.register("a")(ExtraTermDistiller)
    assert registry.name_of(ExtraTermDistiller) == "a"
    assert registry.name_of(UnusedWeightDistiller) is None
    assert DISTILLERS.name_of(DISTILLERS.get("sftn_teacher")) == "sftn_teacher"
