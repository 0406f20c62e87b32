"""A reusable check of the Distiller contract, for any registered method (plugins included).

    import pytest
    from kd_core.testing import check_distiller, registered_methods

    @pytest.mark.parametrize("method", registered_methods())
    def test_contract(method: str) -> None:
        check_distiller(method)

`check_distiller` builds the method on tiny convnets exactly as a sweep would (its default
params, its `source_stages` on a small `SourcePlan`), runs one training step's worth of the
interface and raises AssertionError, or ContractError for mismatched loss terms, with a
message naming the method. No method is special-cased: an internal stage
(`Distiller.internal_stage`, e.g. sftn_teacher) is built as the registered method whose
`source_stages` produces it builds it. Pure PyTorch: no ray, optuna or mlflow.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from kd_core.distillers import DISTILLERS, Distiller, TrainingPosition
from kd_core.models import StagedModel, build_model
from kd_core.recipes import build_recipe
from kd_core.stages import SourcePlan, StageSpec
from kd_core.train import weighted_loss

__all__ = ["bind_sample_index", "build_distiller", "check_distiller", "contract_plan", "registered_methods"]

TEACHER_WIDTH = 16
ASSISTANT_WIDTHS = (12, 8, 6)  # largest first, as a spec lists them
STUDENT_WIDTH = 4
BATCH = 4  # >= 2: BatchNorm in training mode needs two samples


def registered_methods() -> list[str]:
    """Every method name in DISTILLERS (plugins imported so far included), sorted."""
    return DISTILLERS.names()


def convnet_arch(width: int) -> dict[str, Any]:
    return {"name": "convnet", "args": {"width": width, "depth": 1}}


def contract_plan(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> SourcePlan:
    """A small SourcePlan: a convnet teacher, a ladder of narrower assistants, a convnet student.

    The data and recipe are only descriptions (nothing is loaded or trained)."""
    data = {"name": "digits", "seed": 0}
    recipe = build_recipe("digits", {"epochs": 1}).as_dict()
    teacher = StageSpec("teacher", convnet_arch(TEACHER_WIDTH), data, recipe)
    return SourcePlan(
        teacher=teacher, assistants=tuple(convnet_arch(w) for w in ASSISTANT_WIDTHS),
        student_arch=convnet_arch(STUDENT_WIDTH), data=data, recipe=recipe, seed=0,
        num_classes=num_classes, input_shape=(in_channels, image_size, image_size),
    )


def build_distiller(
    name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, seed: int = 0
) -> Distiller:
    """Method `name` with its default params, on freshly initialised models (seeded by `seed`,
    leaving the global RNG as it was): the student from the plan and one model per stage of
    `source_stages(params, contract_plan(...))`.

    A method whose `source_stages` raises ValueError on that plan is built with no sources; an
    internal stage is built from the first stage of its name found in another registered
    method's stage graph (that stage's params, arch as the student, parents as sources).
    Raises AssertionError when no method builds an internal stage, and whatever the method's
    constructor raises.
    """
    cls = DISTILLERS.get(name)
    plan = contract_plan(num_classes, in_channels, image_size)
    if cls.internal_stage:
        stage = _stage_of(name, plan)
        values, student_arch, source_archs = stage.method.get("params", {}), stage.arch, [p.arch for p in stage.parents]
    else:
        values, student_arch = {}, plan.student_arch
        try:
            source_archs = [stage.arch for stage in cls.source_stages(cls.make_params(values), plan)]
        except ValueError:
            source_archs = []  # checked with no sources, if the constructor accepts that
    params = cls.make_params(values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student, *sources = (_model(arch, num_classes, in_channels) for arch in [student_arch, *source_archs])
        return cls(student, sources, params)


def bind_sample_index(distiller: Distiller, labels: torch.Tensor) -> None:
    """For a method with `needs_sample_index`, what `fit` gives it before a step on a batch of
    `labels` (N,): a training set of the batch's labels twice over (2N images) bound with
    `bind_training_set`, and `sample_index` set to the batch's indices in it (0..N-1). Nothing
    for other methods."""
    if type(distiller).needs_sample_index:
        distiller.bind_training_set(labels.repeat(2))
        distiller.sample_index = torch.arange(len(labels), device=labels.device)


def check_distiller(name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
    """Check that registered method `name` keeps the Distiller contract (kd_core.distillers.base).

    Checks, on one batch of (4, in_channels, image_size, image_size) random images:
    unknown params raise a ValueError naming them; `forward_train` takes a defaulted position
    and returns logits (N, num_classes) and finite 0-dim terms named exactly as the params'
    `w_<term>` fields; the weighted loss (as `fit` weights it) backpropagates to every
    parameter of `trainable_modules()`, which `param_groups()` lists exactly once; with
    `frozen_sources`, sources stay in eval mode in training and get no gradient; `after_step`
    returns a dict of floats; in eval mode `predict` equals `deployable()(x)`, shape
    (N, num_classes); the deployable's state_dict restores a fresh distiller's deployable.
    A method with `needs_sample_index` is first bound to a small training set and given the
    batch's indices (`bind_sample_index`), as `fit` does.

    Raises AssertionError (or ContractError for mismatched terms and weights), the message
    naming the method.
    """
    cls = DISTILLERS.get(name)
    label = cls.method_label()
    _check_unknown_param(cls, label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        distiller = build_distiller(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        images = torch.randn(BATCH, in_channels, image_size, image_size)
        labels = torch.arange(BATCH) % num_classes
        bind_sample_index(distiller, labels)
        distiller.train()
        _check_modes(distiller, label)
        logits, terms = _check_forward(distiller, images, labels, num_classes, label)
        _check_gradients(distiller, terms, label)
        extras = distiller.after_step(images, labels, logits.detach())
        _require(isinstance(extras, dict) and all(isinstance(k, str) and isinstance(v, float)
                                                  for k, v in extras.items()),
                 label, f"after_step must return a dict of str -> float, got {extras!r}")
        fresh = build_distiller(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                seed=1)
        bind_sample_index(fresh, labels)
        _check_deployable(distiller, fresh, images, num_classes, label)


def _check_unknown_param(cls: type[Distiller], label: str) -> None:
    try:
        cls.make_params({"no_such_param": 1})
    except ValueError as error:
        _require("no_such_param" in str(error), label, f"the unknown-parameter error does not name it: {error}")
    else:
        raise AssertionError(f"{label}: make_params accepted an unknown parameter 'no_such_param'")


def _check_modes(distiller: Distiller, label: str) -> None:
    if not type(distiller).frozen_sources:
        return  # e.g. SOKD lets its (private) teacher's BN statistics update
    training = [i for i, source in enumerate(distiller.sources) if any(m.training for m in source.modules())]
    _require(not training, label, f"frozen sources {training} leave eval mode after distiller.train()")


def _check_forward(
    distiller: Distiller, images: torch.Tensor, labels: torch.Tensor, num_classes: int, label: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    position = inspect.signature(distiller.forward_train).parameters.get("position")
    _require(position is not None and position.default is not inspect.Parameter.empty, label,
             "forward_train must take `position: TrainingPosition = START` (fit passes it on every step)")
    logits, terms = distiller.forward_train(images, labels, TrainingPosition(1, 0, steps_per_epoch=2, epochs=2))
    expected = (len(labels), num_classes)
    _require(isinstance(logits, torch.Tensor) and tuple(logits.shape) == expected, label,
             f"forward_train returned logits of shape {getattr(logits, 'shape', type(logits))}, expected {expected}")
    _require(isinstance(terms, dict) and len(terms) > 0, label, f"forward_train returned no loss terms: {terms!r}")
    distiller.check_terms(terms)  # ContractError naming the method, the terms and the fields
    for term_name, term in terms.items():
        _require(isinstance(term, torch.Tensor) and term.dim() == 0, label,
                 f"loss term {term_name!r} is not a 0-dim tensor: {getattr(term, 'shape', type(term))}")
        _require(bool(torch.isfinite(term)), label, f"loss term {term_name!r} is not finite: {term.item()}")
    return logits, terms


def _check_gradients(distiller: Distiller, terms: dict[str, torch.Tensor], label: str) -> None:
    names = {id(p): n for n, p in distiller.named_parameters(remove_duplicate=False)}
    trainable = {id(p): p for module in distiller.trainable_modules() for p in module.parameters()}
    grouped = [id(p) for group in distiller.param_groups() for p in group["params"]]
    _require(len(grouped) == len(set(grouped)) and set(grouped) == set(trainable), label,
             "param_groups() must list every parameter of trainable_modules() exactly once")
    source_params = {id(p): p for source in distiller.sources for p in source.parameters()}
    if type(distiller).frozen_sources:
        shared = sorted(names.get(i, "?") for i in set(source_params) & set(trainable))
        _require(not shared, label, f"trainable_modules() include frozen source parameters {shared}")

    distiller.zero_grad(set_to_none=True)
    loss = weighted_loss(terms, distiller.weights)
    _require(loss.dim() == 0 and loss.requires_grad, label,
             "the weighted loss does not backpropagate (no term depends on a trainable parameter)")
    loss.backward()
    no_grad = sorted(names.get(i, "?") for i, p in trainable.items() if p.requires_grad and p.grad is None)
    _require(not no_grad, label, f"trainable parameters get no gradient from the weighted loss: {_short(no_grad)}")
    bad = sorted(names.get(i, "?") for i, p in trainable.items()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
    _require(not bad, label, f"non-finite gradients in {_short(bad)}")
    if type(distiller).frozen_sources:
        reached = sorted(names.get(i, "?") for i, p in source_params.items() if p.grad is not None)
        _require(not reached, label, f"gradients reach frozen source parameters {_short(reached)}")


def _check_deployable(
    distiller: Distiller, fresh: Distiller, images: torch.Tensor, num_classes: int, label: str
) -> None:
    deployable = distiller.deployable()
    _require(distiller.deployable() is deployable, label, "deployable() must return the same module on every call")
    distiller.eval()
    with torch.no_grad():
        predicted, deployed = distiller.predict(images), deployable(images)
    expected = (len(images), num_classes)
    _require(tuple(predicted.shape) == expected and tuple(deployed.shape) == expected, label,
             f"predict / deployable() give shapes {tuple(predicted.shape)} / {tuple(deployed.shape)}, "
             f"expected {expected}")
    _require(torch.allclose(predicted, deployed, rtol=1e-5, atol=1e-6), label,
             "predict(x) and deployable()(x) differ in eval mode")
    try:
        fresh.deployable().load_state_dict(deployable.state_dict())
    except RuntimeError as error:
        raise AssertionError(f"{label}: deployable().state_dict() does not load into a fresh "
                             f"distiller's deployable: {error}") from None
    fresh.eval()
    with torch.no_grad():
        restored = fresh.deployable()(images)
    _require(torch.allclose(restored, deployed, rtol=1e-5, atol=1e-6), label,
             "a fresh distiller's deployable loaded from deployable().state_dict() predicts differently")


def _stage_of(name: str, plan: SourcePlan) -> StageSpec:
    """The first stage trained with method `name` in any non-internal method's stage graph."""
    for other in DISTILLERS.names():
        cls = DISTILLERS.get(other)
        if cls.internal_stage:
            continue
        try:
            pending = list(cls.source_stages(cls.make_params({}), plan))
        except ValueError:
            continue  # needs more than the contract plan offers
        while pending:
            stage = pending.pop(0)
            if stage.method.get("name") == name:
                return stage
            pending.extend(stage.parents)
    label = DISTILLERS.get(name).method_label()
    raise AssertionError(f"{label} is an internal stage, but no registered method's source_stages builds it")


def _model(arch: dict[str, Any], num_classes: int, in_channels: int) -> StagedModel:
    return build_model(arch["name"], num_classes, in_channels, arch.get("args", {}))


def _short(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _require(condition: bool, label: str, message: str) -> None:
    if not condition:
        raise AssertionError(f"{label}: {message}")

