"""A spec's stage graph: the teacher stage, the assistant ladder, the CE baseline, and the
`SourcePlan` each method builds its frozen sources from."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kd_core.checkpoints import sha256_file
from kd_core.distillers import DISTILLERS, MethodParams
from kd_core.recipes import Recipe
from kd_core.stages import SourcePlan, StageSpec

if TYPE_CHECKING:
    from sweeps.spec.schema import ArchSpec, SweepSpec

DEFAULT_ASSISTANTS = 3


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_init(path: str, key: str | None) -> dict[str, Any]:
    """A stage's `init` from a weights file: its content hash is a stage-key determinant."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    status = resolved.stat()
    return {"file": str(resolved), "sha256": _file_hash(str(resolved), status.st_size, status.st_mtime_ns),
            "key": key}


def teacher_stage(spec: SweepSpec) -> StageSpec | None:
    """The teacher: trained by the sweep, or pretrained (a file, a pinned MLflow model) and
    only evaluated. A model_uri teacher must be pinned first (`sweeps.pretrained.pin_teacher`)."""
    teacher = spec.teacher
    if teacher is None:
        return None
    if teacher.arch is None or (teacher.model_uri and teacher.resolved is None):
        raise ValueError(f"teacher.model_uri {teacher.model_uri!r} is not resolved yet (kdsweep run does it)")
    if teacher.checkpoint:
        recipe, init = None, file_init(teacher.checkpoint, teacher.checkpoint_key)
    elif teacher.model_uri:
        recipe, init = None, dict(teacher.resolved or {})
    else:
        recipe, init = spec.teacher_recipe.build().as_dict(), None
    return StageSpec(role="teacher", arch=teacher.arch.model_dump(), data=spec.data.model_dump(),
                     recipe=recipe, seed=teacher.seed, init=init)


def student_init(spec: SweepSpec) -> dict[str, Any] | None:
    """Where every student (trials, baseline, confirmations) starts from, if not from scratch."""
    student = spec.student
    return file_init(student.init_checkpoint, student.checkpoint_key) if student.init_checkpoint else None


def baseline_stage(spec: SweepSpec, recipe: Recipe, student_arch: dict[str, Any]) -> StageSpec:
    """The CE-only student of `student_arch`, trained with `recipe` (from the students' init)."""
    return StageSpec(
        role="baseline",
        arch=student_arch,
        data=spec.data.model_dump(),
        recipe=recipe.as_dict(),
        seed=spec.sweep.seed,
        init=student_init(spec),
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
