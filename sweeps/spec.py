"""The sweep spec: YAML -> validated pydantic model. Every error names the offending field."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from kd_core.data import DATASETS
from kd_core.distillers import DISTILLERS, Distiller
from kd_core.models import MODELS
from kd_core.recipes import RECIPES, Recipe
from kd_core.registry import Registry
from sweeps.sources import source_plan

SEARCH_PREFIXES = ("method.", "recipe.", "student.args.")


class SpecError(ValueError):
    """A user error in a sweep spec or argument; the message names the problem."""


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a dataclass with type coercion; errors name the field."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown field {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
        )
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as error:
        raise ValueError(format_errors(error, sep="; ")) from None


def factory_args(factory: Any, args: dict[str, Any], fixed: tuple[str, ...] = ()) -> dict[str, Any]:
    """`args` checked against a factory's signature, coerced to its type hints, defaults filled
    in (so equal settings always look equal, e.g. in stage keys)."""
    parameters = {name: p for name, p in inspect.signature(factory).parameters.items() if name not in fixed}
    unknown = sorted(set(args) - set(parameters))
    if unknown:
        raise ValueError(f"unknown argument {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(parameters) or 'none'})")
    hints = typing.get_type_hints(factory, include_extras=True)  # keeps Annotated bounds
    resolved = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for name, value in args.items():
        try:
            resolved[name] = TypeAdapter(hints.get(name, Any)).validate_python(value)
        except ValidationError as error:
            raise ValueError(f"{name}: {format_errors(error, sep='; ')}") from None
    missing = [name for name in parameters if name not in resolved]
    if missing:
        raise ValueError(f"missing argument {', '.join(map(repr, missing))}")
    return resolved


def format_errors(error: ValidationError, sep: str = "\n") -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return sep.join(lines)


def registered(registry: Registry) -> AfterValidator:
    """A name that must be in `registry`; the error lists the known names."""

    def check(name: str) -> str:
        registry.get(name)
        return name

    return AfterValidator(check)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArchSpec(Strict):
    name: Annotated[str, registered(MODELS)]
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _args(cls, args: dict[str, Any], info: Any) -> dict[str, Any]:
        if "name" not in info.data:
            return args
        factory = MODELS.get(info.data["name"])
        resolved = factory_args(factory, args, fixed=("num_classes", "in_channels"))
        factory(num_classes=10, in_channels=3, **resolved)  # the factory's own value checks
        return resolved

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


class TeacherSpec(Strict):
    arch: ArchSpec
    recipe: RecipeSpec | None = None  # default: the student's recipe
    seed: int = 0


class StudentSpec(Strict):
    arch: ArchSpec


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
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled parameter needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("'log' and 'step' cannot be combined")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("an int parameter needs whole-number 'low' and 'high'")
        return self

    def condition_holds(self, values: dict[str, Any]) -> bool:
        """Whether every `when` condition holds for the values chosen so far."""
        for path, expected in self.when.items():
            allowed = expected if isinstance(expected, list) else [expected]
            if values.get(path) not in allowed:
                return False
        return True


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(3, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SamplerSpec(Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(6, ge=0)
    multivariate: bool = True
    constant_liar: bool = True


class ConfirmSpec(Strict):
    """Re-train the top-k configurations (ranked on val) with `seeds` new seeds each."""

    top_k: int = Field(0, ge=0)  # 0: no confirmation
    seeds: int = Field(3, ge=1)


class TeacherCacheSpec(Strict):
    """Frozen sources' logits on the training set, computed once per sweep storage and shared
    by every trial (used only by methods whose sources stay frozen and give only logits)."""

    enabled: bool = True
    views: int = Field(4, ge=1)  # augmentation views per image (1 when there is no augmentation)
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0  # draws the views


class SweepSettings(Strict):
    num_trials: int = Field(16, ge=1)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # > 0 trains on CUDA; fractions share a GPU
    #: CUDA only (CPU trials train in float32 whatever is set here).
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    channels_last: bool = False
    teacher_cache: TeacherCacheSpec = Field(default_factory=TeacherCacheSpec)
    seed: int = 0  # student initialisation and shuffling
    max_failures: int = Field(0, ge=0)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)
    #: `[accuracy]`, or `[accuracy, params | flops]` for a multi-objective search that also
    #: minimises the deployed student's cost (reported as a Pareto front).
    objectives: list[Literal["accuracy", "params", "flops"]] = Field(default_factory=lambda: ["accuracy"])
    #: Configurations tried first (partial ones allowed: the sampler fills in the rest).
    initial_points: list[dict[str, Any]] = Field(default_factory=list)


    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_trial > 0 else "cpu"

    @property
    def cost(self) -> str | None:
        """The cost objective of a multi-objective sweep, else None."""
        return self.objectives[1] if len(self.objectives) > 1 else None

    @model_validator(mode="after")
    def _objectives(self) -> SweepSettings:
        if not self.objectives or self.objectives[0] != "accuracy" or len(self.objectives) > 2 \
                or "accuracy" in self.objectives[1:]:
            raise ValueError("objectives: [accuracy] or [accuracy, params | flops]")
        if self.cost and self.scheduler.type == "asha":
            raise ValueError("a multi-objective sweep cannot use ASHA (it stops trials on one metric): "
                             "set scheduler: {type: none}")
        return self


class TrackingSpec(Strict):
    experiment: str = "kdsweep"
    registered_model: str | None = None  # default: "<spec name>-student"


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SweepSpec(Strict):
    name: str
    description: str = ""
    #: Modules imported first, so the methods, models and datasets they register can be used
    #: (in the driver and in every trial process; they must be importable on every node).
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

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, plugins: list[str]) -> list[str]:
        for module in plugins:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ValueError(f"cannot import plugin {module!r}: {error}") from None
        return plugins

    @field_validator("search")
    @classmethod
    def _not_empty(cls, search: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not search:
            raise ValueError("the search space is empty: add at least one parameter")
        return search

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        check_method_choices(self)
        self.method.params = check_method_params(self)
        check_search_space(self)
        check_sources(self)
        check_initial_points(self)
        return self

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


def check_method_choices(spec: SweepSpec) -> None:
    searched = spec.search.get("method.name")
    if searched is None:
        return
    if searched.type != "categorical":
        raise ValueError("search.method.name: method.name takes 'choices'")
    for choice in searched.choices or []:
        if choice not in DISTILLERS:
            raise ValueError(f"search.method.name: unknown method {choice!r} "
                             f"(known: {', '.join(DISTILLERS.names())})")


def check_initial_points(spec: SweepSpec) -> None:
    for index, point in enumerate(spec.sweep.initial_points):
        where = f"sweep.initial_points.{index}"
        for path, value in point.items():
            if path not in spec.search:
                raise ValueError(f"{where}: {path!r} is not a searched parameter")
            param = spec.search[path]
            if param.type == "categorical" and value not in (param.choices or []):
                raise ValueError(f"{where}: {path}={value!r} is not one of {param.choices}")
            if param.type != "categorical" and not (
                isinstance(value, int | float) and param.low <= value <= param.high
            ):
                raise ValueError(f"{where}: {path}={value!r} is outside [{param.low}, {param.high}]")


def check_sources(spec: SweepSpec) -> None:
    """Every candidate method can build its source stages, at every extreme of its searched
    parameters (a missing teacher, too few assistants, ...)."""
    plan = source_plan(spec, num_classes=10, input_shape=(3, 32, 32))  # shapes change no stage
    for method in spec.candidate_methods():
        cls = DISTILLERS.get(method)
        probes: list[dict[str, Any]] = [{}]
        for path, param in spec.search.items():
            if path.startswith("method.") and path != "method.name" and method in _method_classes(spec, param):
                probes += [{path.split(".", 1)[1]: value} for value in _probe_values(param)]
        for probe in probes:
            params = dataclass_from_dict(cls.Params, {**spec.fixed_params(method), **probe})
            try:
                cls.source_stages(params, plan)
            except ValueError as error:
                at = f" with {', '.join(f'{k}={v}' for k, v in probe.items())}" if probe else ""
                raise ValueError(f"method {method}{at}: {error}") from None


def check_method_params(spec: SweepSpec) -> dict[str, Any]:
    """Fixed method params, each known to some candidate method and valid for all that have it;
    returns them coerced to their types."""
    params = dict(spec.method.params)
    candidates = spec.candidate_methods()
    for key in params:
        if not any(key in param_names(m) for m in candidates):
            known = sorted({n for m in candidates for n in param_names(m)})
            raise ValueError(f"method.params: unknown parameter {key!r} (known: {', '.join(known)})")
    for method in candidates:
        try:
            typed = dataclass_from_dict(DISTILLERS.get(method).Params, spec.fixed_params(method))
        except ValueError as error:
            raise ValueError(f"method.params: {error}") from None
        params.update({k: getattr(typed, k) for k in spec.fixed_params(method)})
    return params


def _method_classes(spec: SweepSpec, param: ParamSpec) -> dict[str, type[Distiller]]:
    """The methods a `method.*` parameter can apply to, given its `when` on method.name."""
    names = spec.candidate_methods()
    if "method.name" in param.when:
        allowed = param.when["method.name"]
        allowed = allowed if isinstance(allowed, list) else [allowed]
        names = [n for n in names if n in allowed]
    return {n: DISTILLERS.get(n) for n in names}


def check_search_space(spec: SweepSpec) -> None:
    """Every searched path exists for every method it can apply to; `when` refers back."""
    seen: list[str] = []
    for path, param in spec.search.items():
        where = f"search.{path}"
        if not path.startswith(SEARCH_PREFIXES):
            raise ValueError(f"{where}: searchable paths start with {' or '.join(SEARCH_PREFIXES)}")
        for condition in param.when:
            searched_later = condition in spec.search and condition not in seen
            if searched_later or (condition not in seen and condition not in spec.fixed_values()):
                raise ValueError(
                    f"{where}.when: {condition!r} must be a parameter listed before {path!r}"
                )
        field = path.split(".", 1)[1]
        if path == "method.name":
            pass  # checked by check_method_choices
        elif path.startswith("method."):
            methods = _method_classes(spec, param)
            lacking = [n for n, cls in methods.items()
                       if field not in {f.name for f in dataclasses.fields(cls.Params)}]
            if lacking:
                raise ValueError(
                    f"{where}: method {', '.join(lacking)} has no parameter {field!r}"
                    " (restrict it with when: {method.name: [...]})"
                )
            for name, cls in methods.items():
                base = spec.fixed_params(name)
                _check_values(where, param,
                              lambda v, c=cls, b=base, f=field: dataclass_from_dict(c.Params, {**b, f: v}))
        elif path.startswith("student.args."):
            factory = MODELS.get(spec.student.arch.name)
            name = path.split(".", 2)[2]

            def build(value: Any, name: str = name, factory: Any = factory) -> None:
                args = factory_args(factory, {**spec.student.arch.args, name: value},
                                    fixed=("num_classes", "in_channels"))
                factory(num_classes=10, in_channels=3, **args)

            _check_values(where, param, build)
        else:
            _check_values(where, param, lambda v, f=field: spec.recipe.build({f: v}))
        seen.append(path)


def _probe_values(param: ParamSpec) -> list[Any]:
    """The extremes of a range, or every choice."""
    if param.type == "categorical":
        return list(param.choices or [])
    cast = int if param.type == "int" else float
    return [cast(param.low), cast(param.high)]


def _check_values(where: str, param: ParamSpec, build: Any) -> None:
    """Build with the extreme (or every categorical) value so bad ranges fail now."""
    for value in _probe_values(param):
        try:
            build(value)
        except ValueError as error:
            raise ValueError(f"{where}: value {value!r} is invalid: {error}") from None


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a sweep spec must be a YAML mapping")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"invalid sweep spec {source}:\n  "
                        + format_errors(error).replace("\n", "\n  ")) from None


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(data, str(path))
