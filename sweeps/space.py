"""Spec -> Optuna define-by-run space, and sampled values -> the trial's resolved plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from kd_core.distillers import DISTILLERS, MethodParams
from kd_core.recipes import Recipe
from sweeps.sources import student_init
from sweeps.spec import ParamSpec, SweepSpec


def suggest(trial: optuna.Trial, path: str, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(path, param.choices)
    if param.type == "int":
        step = int(param.step) if param.step else 1
        return trial.suggest_int(path, int(param.low), int(param.high), step=step, log=param.log)
    return trial.suggest_float(path, param.low, param.high, step=param.step, log=param.log)


class SearchSpace:
    """The define-by-run function: parameters in spec order, each only when its `when` holds.

    A class rather than a closure because Tune pickles the searcher with its state.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> None:
        values = self.spec.fixed_values()
        for path, param in self.spec.search.items():
            if param.condition_holds(values):
                values[path] = suggest(trial, path, param)


@dataclass(frozen=True)
class TrialPlan:
    """Everything one trial trains, resolved from the spec and its sampled values."""

    method: str
    params: MethodParams
    recipe: Recipe
    student_arch: dict[str, Any]  # {"name": ..., "args": {...}}, searched arguments applied
    sampled: dict[str, Any]
    student_init: dict[str, Any] | None = None  # the students' initial weights (sources.student_init)

    def param_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self.params).items()}


def resolve_trial(spec: SweepSpec, sampled: dict[str, Any]) -> TrialPlan:
    method = sampled.get("method.name", spec.method.name)
    base = spec.fixed_params(method)
    searched = {
        path.split(".", 1)[1]: value
        for path, value in sampled.items()
        if path.startswith("method.") and path != "method.name"
    }
    recipe_overrides = {
        path.split(".", 1)[1]: value for path, value in sampled.items() if path.startswith("recipe.")
    }
    student_args = {
        path.split(".", 2)[2]: value for path, value in sampled.items() if path.startswith("student.args.")
    }
    student_arch = {"name": spec.student.arch.name, "args": {**spec.student.arch.args, **student_args}}
    params = DISTILLERS.get(method).make_params({**base, **searched})
    return TrialPlan(method, params, spec.recipe.build(recipe_overrides), student_arch, dict(sampled),
                     student_init(spec))
