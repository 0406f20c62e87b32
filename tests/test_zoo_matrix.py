"""Every registered method on every (teacher, student) pair of the CRD and SimKD CIFAR-100
benchmark tables, and on every CIFAR zoo model as a student of resnet32x4, at 32x32 with 100
classes: `forward_train` (training mode) gives (N, 100) logits and finite terms named as the
weights, `predict` equals the deployable, and the deployable reloads from its state dict into a
fresh build and traces with torch.jit to the same logits.

Methods come from the registry (an internal stage is built as kd_core.testing builds it, from
the stage graph of the method that uses it); each model is built once and deep-copied. A case
that builds exactly what an earlier one built (same method, params, student and source
architectures: e.g. CE or LW-KD, which never read the pair's teacher) runs once. No method may
refuse a pair: every case must build and run.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
import torch

from kd_core.distillers import DISTILLERS, Distiller
from kd_core.models import MODELS, StagedModel, build_model
from kd_core.recipes import build_recipe
from kd_core.stages import SourcePlan, StageSpec
from kd_core.testing import (
    _stage_of,  # builds an internal stage as its parent method does
    bind_sample_index,
)

CLASSES, IMAGE, BATCH = 100, 32, 2

# (teacher, student) of the benchmark tables: RepDistiller's README (CRD, ICLR 2020), same
# family then across families, and SimKD's README (CVPR 2022) where it adds pairs.
BENCHMARK_PAIRS: tuple[tuple[str, str], ...] = (
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"),
    ("vgg13", "mobilenetv2_0_5"), ("resnet50", "mobilenetv2_0_5"), ("resnet50", "vgg8"),
    ("resnet32x4", "shufflenetv1"), ("resnet32x4", "shufflenetv2"), ("wrn_40_2", "shufflenetv1"),
    ("resnet32x4", "vgg8"), ("resnet32x4", "shufflenetv2_1_5"),
)
CIFAR_ZOO = sorted(name for name in MODELS.names()
                   if MODELS.get(name).__module__.rsplit(".", 1)[-1] in
                   {"cifar_resnet", "wrn", "vgg", "mobilenetv2", "shufflenet"})
PAIRS = BENCHMARK_PAIRS + tuple(("resnet32x4", student) for student in CIFAR_ZOO
                                if ("resnet32x4", student) not in BENCHMARK_PAIRS)
DATA = {"name": "cifar100", "seed": 0}
# Cheaper values that take the same code paths: LW-KD's soft-target bank runs its teacher on
# bank_size x 100 synthesized images on the first batch (3,200 by default: 2 s a case).
CHEAP = {"lwkd": {"bank_size": 2}}
RECIPE = build_recipe("crd", {"epochs": 1}).as_dict()


def _plan(teacher: str, student: str) -> SourcePlan:
    # Assistants (TAKD, DGKD) of the student's architecture: only their logits are read here.
    return SourcePlan(
        teacher=StageSpec("teacher", {"name": teacher}, DATA, RECIPE), assistants=({"name": student},) * 3,
        student_arch={"name": student}, data=DATA, recipe=RECIPE, seed=0, num_classes=CLASSES,
        input_shape=(3, IMAGE, IMAGE),
    )


@functools.lru_cache(maxsize=8)  # cases run pair by pair: the pair's models stay built
def _built(arch_json: str) -> StagedModel:
    arch = json.loads(arch_json)
    torch.manual_seed(0)
    return build_model(arch["name"], CLASSES, 3, arch.get("args", {}))


def _model(arch: dict[str, Any]) -> StagedModel:
    """A trainable copy of the built model (the built one may have been frozen as a source)."""
    return copy.deepcopy(_built(json.dumps(arch, sort_keys=True))).requires_grad_(True).train()


def _construction(method: str, teacher: str, student: str) -> tuple[dict[str, Any], dict, list[dict]]:
    """What `method` is built from on the pair: its params (defaults), the student's
    architecture and its sources' (from its own stage graph). Pure: builds no model."""
    cls = DISTILLERS.get(method)
    plan = _plan(teacher, student)
    if cls.internal_stage:
        stage = _stage_of(method, plan)
        return stage.method.get("params", {}), stage.arch, [parent.arch for parent in stage.parents]
    values = CHEAP.get(method, {})
    return values, plan.student_arch, [stage.arch for stage in cls.source_stages(cls.make_params(values), plan)]


def _distiller(method: str, teacher: str, student: str) -> Distiller:
    """`method` with its default params on the pair, its sources from its own stage graph.

    The student is a copy (it trains); sources are the built models themselves: a distiller
    only freezes and reads them (a method that changes a source, e.g. SOKD's teacher BN, works
    on a private copy)."""
    cls = DISTILLERS.get(method)
    values, student_arch, source_archs = _construction(method, teacher, student)
    sources = [_built(json.dumps(arch, sort_keys=True)) for arch in source_archs]
    return cls(_model(student_arch), sources, cls.make_params(values))


def _cases() -> list[tuple[str, str, str]]:
    """(teacher, student, method) for every pair and registered method, pair by pair, each
    distinct construction once."""
    cases, seen = [], set()
    for teacher, student in PAIRS:
        for method in DISTILLERS.names():
            key = json.dumps([method, _construction(method, teacher, student)], sort_keys=True)
            if key not in seen:
                seen.add(key)
                cases.append((teacher, student, method))
    return cases


CASES = _cases()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator), torch.tensor([0, CLASSES - 1])


def _scrambled(module: torch.nn.Module) -> torch.nn.Module:
    """Every floating parameter and buffer redrawn: a reload must restore all of them."""
    with torch.no_grad():
        for value in module.state_dict().values():
            if value.is_floating_point():
                value.normal_()
    return module


def _check_export(deployable: torch.nn.Module, fresh: torch.nn.Module, images: torch.Tensor) -> None:
    deployable.eval()
    with torch.no_grad():
        expected = deployable(images)
        fresh.load_state_dict(deployable.state_dict())
        fresh.eval()
        torch.testing.assert_close(fresh(images), expected, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(deployable, images, check_trace=False)
        torch.testing.assert_close(traced(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("teacher", "student", "method"), CASES, ids=[f"{m}:{t}->{s}" for t, s, m in CASES])
def test_method_on_pair(teacher: str, student: str, method: str) -> None:
    torch.manual_seed(0)
    distiller = _distiller(method, teacher, student)
    images, labels = _batch()
    bind_sample_index(distiller, labels)  # what fit gives a method that reads sample indices (CRD)
    distiller.train()
    with torch.no_grad():  # shapes and values only: tests/test_contract.py checks the gradients
        logits, terms = distiller.forward_train(images, labels)
    assert logits.shape == (BATCH, CLASSES)
    distiller.check_terms(terms)
    assert all(term.dim() == 0 and torch.isfinite(term) for term in terms.values()), terms

    distiller.eval()
    deployable = distiller.deployable()
    with torch.no_grad():
        predicted = distiller.predict(images)
        assert predicted.shape == (BATCH, CLASSES)
        if deployable is distiller.student and type(distiller).predict is Distiller.predict:
            return  # predict is the student's forward, and a zoo model's export is checked below
        torch.testing.assert_close(predicted, deployable(images), rtol=1e-5, atol=1e-5)
    if deployable is distiller.student:
        return
    fresh = _distiller(method, teacher, student).deployable()
    _check_export(deployable, _scrambled(fresh), images)


@pytest.mark.parametrize("name", sorted({name for pair in PAIRS for name in pair}))
def test_zoo_model_exports(name: str) -> None:
    model = _model({"name": name})
    images, _ = _batch()
    with torch.no_grad():
        model.train()(images)  # BN statistics move, as in training: the reload must restore them
    _check_export(model, _scrambled(build_model(name, CLASSES, 3)), images)
