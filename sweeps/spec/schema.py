"""The sweep spec's schema: pydantic models whose validators check one field or one block.

Checks that span blocks (methods vs search space vs sources) are in `checks.py`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from kd_core.data import DATASETS
from kd_core.distillers import DISTILLERS
from kd_core.models import MODELS
from kd_core.recipes import RECIPES, Recipe
from kd_core.registry import Registry
from sweeps.spec.coerce import Strict, dataclass_from_dict, factory_args
from sweeps.spec.settings import SweepSettings

SEARCH_PREFIXES = ("method.", "recipe.", "student.args.")


def registered(registry: Registry) -> AfterValidator:
    """A name that must be in `registry`; the error lists the known names."""

    def check(name: str) -> str:
        registry.get(name)
        return name

    return AfterValidator(check)


def arch_args(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """An architecture's arguments coerced, defaults filled in, and checked by building it once
    (the factory's own value checks); raises ValueError naming the argument."""
    factory = MODELS.get(name)
    resolved = factory_args(factory, args, fixed=("num_classes", "in_channels"))
    factory(num_classes=10, in_channels=3, **resolved)
    return resolved


class ArchSpec(Strict):
    name: Annotated[str, registered(MODELS)]
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _args(cls, args: dict[str, Any], info: Any) -> dict[str, Any]:
        return arch_args(info.data["name"], args) if "name" in info.data else args

    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"{self.name}({inner})"


class DataSpec(BaseModel):
    """A registered dataset and its factory's arguments: `{name: digits, val_fraction: 0.2}`."""

    model_config = ConfigDict(extra="allow")
    name: Annotated[str, registered(DATASETS)] = "digits"

    @model_validator(mode="after")
    def _args(self) -> DataSpec:
        self.__pydantic_extra__ = factory_args(DATASETS.get(self.name), dict(self.model_extra or {}))
        return self

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RecipeSpec(BaseModel):
    """A named recipe plus overrides of its fields: `{name: digits, epochs: 10}`."""

    model_config = ConfigDict(extra="allow")
    name: Annotated[str, registered(RECIPES)] = "digits"

    @model_validator(mode="after")
    def _builds(self) -> RecipeSpec:
        self.build()
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self, extra: dict[str, Any] | None = None) -> Recipe:
        values = {**RECIPES.get(self.name).as_dict(), **self.overrides, **(extra or {})}
        return dataclass_from_dict(Recipe, values)


class MethodSpec(Strict):
    """The method, and fixed parameter values; each value applies to every candidate method
    (the fixed one, or those `method.name` searches over) that has a parameter of that name."""

    name: Annotated[str, registered(DISTILLERS)] = "kd"
    params: dict[str, Any] = Field(default_factory=dict)


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def absolute_path(path: str | None) -> str | None:
    """A user's file path made absolute against the current directory: workers run elsewhere."""
    return str(Path(path).expanduser().resolve()) if path else path


class TeacherSpec(Strict):
    """A teacher the sweep trains (`arch`, `recipe`, `seed`), or a pretrained one, never trained:
    `arch` + `checkpoint` (a state-dict file), or `model_uri` (a kdsweep sweep's exported
    student in MLflow: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID/export`)."""

    arch: ArchSpec | None = None  # with model_uri: taken from the model (must agree when given)
    recipe: RecipeSpec | None = None  # default: the student's recipe
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_key: str | None = None  # the key holding the state dict, when not found by itself
    model_uri: str | None = None
    #: Filled in when a sweep starts (`sweeps.pretrained.pin_teacher`), kept for resume: the
    #: model version's run id, artifact path, pinned URI and the weights' content hash.
    resolved: dict[str, str] | None = None

    @field_validator("checkpoint")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        return absolute_path(path)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.checkpoint and self.model_uri:
            raise ValueError("give either 'checkpoint' or 'model_uri', not both")
        if (self.checkpoint or self.model_uri) and self.recipe is not None:
            raise ValueError("a pretrained teacher (checkpoint or model_uri) is not trained: remove 'recipe'")
        if self.checkpoint_key is not None and not self.checkpoint:
            raise ValueError("'checkpoint_key' needs a 'checkpoint'")
        if self.model_uri is None and self.arch is None:
            raise ValueError("'arch' is required (unless the teacher is a 'model_uri')")
        if self.model_uri is not None and not self.model_uri.startswith(MODEL_URI_SCHEMES):
            raise ValueError(f"model_uri {self.model_uri!r}: use models:/NAME@ALIAS, models:/NAME/VERSION "
                             "or runs:/RUN_ID/export")
        return self

    @property
    def pretrained(self) -> bool:
        return bool(self.checkpoint or self.model_uri)


class StudentSpec(Strict):
    arch: ArchSpec
    #: Initial weights (a state-dict file); a head of another class count is replaced by a new one.
    init_checkpoint: str | None = None
    checkpoint_key: str | None = None

    @field_validator("init_checkpoint")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        return absolute_path(path)

    @model_validator(mode="after")
    def _key_needs_file(self) -> StudentSpec:
        if self.checkpoint_key is not None and not self.init_checkpoint:
            raise ValueError("'checkpoint_key' needs an 'init_checkpoint'")
        return self


def param_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(DISTILLERS.get(method).Params)]


class ParamSpec(Strict):
    """One searched parameter: `choices`, or `low`/`high` (float unless `type: int`)."""

    type: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shape(self) -> ParamSpec:
        if self.type is None:
            self.type = "categorical" if self.choices is not None else "float"
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("give either 'choices' or 'low'/'high', not both")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes 'low'/'high', not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError("a numeric parameter needs both 'low' and 'high'")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite numbers, got {self.low} and {self.high}")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled parameter needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("'log' and 'step' cannot be combined")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("an int parameter needs whole-number 'low' and 'high'")
        if self.step is not None:
            if not (math.isfinite(self.step) and self.step > 0):
                raise ValueError(f"step must be > 0, got {self.step}")
            if self.type == "int" and not self.step.is_integer():
                raise ValueError(f"an int parameter needs a whole-number 'step', got {self.step}")
            if self.step > self.high - self.low:
                raise ValueError(f"step ({self.step}) is larger than the range high - low ({self.high - self.low})")
        return self

    def condition_holds(self, values: dict[str, Any]) -> bool:
        """Whether every `when` condition holds for the values chosen so far."""
        for path, expected in self.when.items():
            allowed = expected if isinstance(expected, list) else [expected]
            if values.get(path) not in allowed:
                return False
        return True


class TrackingSpec(Strict):
    experiment: str = "kdsweep"
    registered_model: str | None = None  # default: "<spec name>-student"
    #: When the exported version takes the `champion` alias: `better` (only when its val accuracy
    #: beats the current champion's on the same data; the first version always), `always`, `never`.
    champion: Literal["better", "always", "never"] = "better"


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SweepSpec(Strict):
    name: str
    description: str = ""
    #: Modules that register methods, models or datasets: `load_plugins` imports them before
    #: the spec is validated, and every worker process before it uses the spec (so they must
    #: be importable on every node).
    plugins: list[str] = Field(default_factory=list)
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec | None = None
    student: StudentSpec
    #: Teacher-assistant architectures, largest first; methods with n assistants use the first
    #: n. Default: 3 sizes spaced between teacher and student when both are one family.
    assistants: list[ArchSpec] | None = None
    method: MethodSpec = Field(default_factory=MethodSpec)
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    search: dict[str, ParamSpec]
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError("use letters, digits, '_', '.' and '-' (at most 100 characters)")
        return name

    @field_validator("search")
    @classmethod
    def _not_empty(cls, search: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not search:
            raise ValueError("the search space is empty: add at least one parameter")
        return search

    @property
    def teacher_recipe(self) -> RecipeSpec:
        return self.teacher.recipe if self.teacher and self.teacher.recipe else self.recipe

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or f"{self.name}-student"

    def candidate_methods(self) -> list[str]:
        searched = self.search.get("method.name")
        return list(searched.choices) if searched else [self.method.name]

    def fixed_params(self, method: str) -> dict[str, Any]:
        """The spec's fixed parameter values that `method` has."""
        names = param_names(method)
        return {k: v for k, v in self.method.params.items() if k in names}

    def fixed_values(self) -> dict[str, Any]:
        """Values of searchable paths that are not searched (for `when` conditions)."""
        return {"method.name": self.method.name}
