"""A spec's stage graph: the teacher stage, the assistant ladder, the CE baseline, and the
`SourcePlan` each method builds its frozen sources from."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kd_core.distillers import DISTILLERS, MethodParams
from kd_core.recipes import Recipe
from kd_core.stages import SourcePlan, StageSpec

if TYPE_CHECKING:
    from sweeps.spec.schema import ArchSpec, SweepSpec

DEFAULT_ASSISTANTS = 3


def teacher_stage(spec: SweepSpec) -> StageSpec | None:
    if spec.teacher is None:
        return None
    return StageSpec(
        role="teacher",
        arch=spec.teacher.arch.model_dump(),
        data=spec.data.model_dump(),
        recipe=spec.teacher_recipe.build().as_dict(),
        seed=spec.teacher.seed,
    )


def baseline_stage(spec: SweepSpec, recipe: Recipe, student_arch: dict[str, Any]) -> StageSpec:
    """The CE-only student of `student_arch`, trained with `recipe`."""
    return StageSpec(
        role="baseline",
        arch=student_arch,
        data=spec.data.model_dump(),
        recipe=recipe.as_dict(),
        seed=spec.sweep.seed,
    )


def spaced_assistants(teacher: ArchSpec, student: ArchSpec, count: int) -> list[dict[str, Any]]:
    """`count` sizes between teacher and student, largest first: each numeric argument
    spaced geometrically. Only for one family whose sizes are arguments (e.g. convnet)."""
    if teacher.name != student.name or set(teacher.args) != set(student.args):
        return []
    if not all(isinstance(v, int) and v > 0 for v in [*teacher.args.values(), *student.args.values()]):
        return []
    ladder = []
    for i in range(1, count + 1):
        f = i / (count + 1)
        args = {k: round(math.exp((1 - f) * math.log(teacher.args[k]) + f * math.log(student.args[k])))
                for k in teacher.args}
        ladder.append({"name": teacher.name, "args": args})
    return ladder


def assistant_archs(spec: SweepSpec) -> tuple[dict[str, Any], ...]:
    if spec.assistants is not None:
        return tuple(a.model_dump() for a in spec.assistants)
    if spec.teacher is None:
        return ()
    return tuple(spaced_assistants(spec.teacher.arch, spec.student.arch, DEFAULT_ASSISTANTS))


def source_plan(
    spec: SweepSpec, num_classes: int, input_shape: tuple[int, ...], student_arch: dict[str, Any] | None = None
) -> SourcePlan:
    return SourcePlan(
        teacher=teacher_stage(spec),
        assistants=assistant_archs(spec),
        student_arch=student_arch or spec.student.arch.model_dump(),
        data=spec.data.model_dump(),
        recipe=spec.recipe.build().as_dict(),
        seed=spec.sweep.seed,
        num_classes=num_classes,
        input_shape=input_shape,
        fixed_params=dict(spec.method.params),
    )


def source_stages(method: str, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
    """The frozen stages a method learns from, in the order its distiller receives them."""
    return DISTILLERS.get(method).source_stages(params, plan)
