"""Cross-field checks of a sweep spec: every candidate method, searched path, initial point
and source stage must be buildable, probed at the extremes of each searched range."""

from __future__ import annotations

import dataclasses
from typing import Any

from kd_core.checkpoints import CheckpointError, load_weights, read_state_dict
from kd_core.data import DATASETS
from kd_core.distillers import DISTILLERS, Distiller
from kd_core.distributed import check_data_parallel
from kd_core.models import build_model
from sweeps.sources import source_plan
from sweeps.spec.coerce import dataclass_from_dict
from sweeps.spec.schema import SEARCH_PREFIXES, ParamSpec, SweepSpec, arch_args, param_names


def check_spec(spec: SweepSpec) -> None:
    """Run every cross-field check; coerces the fixed method params in place.

    Raises ValueError naming the field.
    """
    check_method_choices(spec)
    spec.method.params = check_method_params(spec)
    check_search_space(spec)
    check_weights(spec)
    check_recipes(spec)
    check_scheduler(spec)
    check_sources(spec)
    check_initial_points(spec)
    check_pretrained(spec)
    check_workers(spec)


MAX_RECIPE_PROBES = 256  # combinations of searched recipe extremes built; beyond, each extreme alone


def check_scheduler(spec: SweepSpec) -> None:
    """ASHA compares trials first after `grace_period` epochs, so that must fit in the epochs; the
    default grace period is cut to the epochs (a given one is refused)."""
    scheduler, epochs = spec.sweep.scheduler, spec.recipe.build().epochs
    if "grace_period" not in scheduler.model_fields_set:
        scheduler.grace_period = min(scheduler.grace_period, epochs)
    if scheduler.type == "asha" and scheduler.grace_period > epochs:
        raise ValueError(
            f"sweep.scheduler.grace_period ({scheduler.grace_period}) is more than recipe.epochs ({epochs}): "
            f"ASHA first compares trials after grace_period epochs; set sweep.scheduler.grace_period to at most "
            f"{epochs}, raise recipe.epochs, or use sweep.scheduler: {{type: none}}")


def check_weights(spec: SweepSpec) -> None:
    """Each candidate method can weigh some loss term above 0: with every `w_*` at 0 (fixed, or
    searched over ranges that allow only 0) the student would learn nothing."""
    for method in spec.candidate_methods():
        params = dataclass_from_dict(DISTILLERS.get(method).Params, spec.fixed_params(method))
        highest, searched = params.weights(), []
        for term in highest:
            param = spec.search.get(f"method.w_{term}")
            if param is not None and method in _method_classes(spec, param):
                highest[term] = max(float(v) for v in _probe_values(param))
                searched.append(f"search.method.w_{term}")
        if highest and not any(highest.values()):
            names = ", ".join(f"w_{t}" for t in highest)
            where = f"method {method}: {', '.join(searched)} and method.params" if searched else \
                f"method {method}: method.params"
            raise ValueError(f"{where}: every loss weight ({names}) is 0, so the student would learn nothing; "
                             "give at least one a value above 0")


def check_recipes(spec: SweepSpec) -> None:
    """Every combination of the searched recipe fields' extremes builds (its optimizer and schedule
    too: `Recipe` builds them), not only each extreme alone (`recipe.momentum` 0 with a searched
    `recipe.nesterov`)."""
    paths = [p for p in spec.search if p.startswith("recipe.")]
    points: list[dict[str, Any]] = [{}]
    for path in paths:
        points = [{**point, path: value} for point in points for value in _probe_values(spec.search[path])]
        if len(points) > MAX_RECIPE_PROBES:
            return  # each extreme alone was built by check_search_space
    if len(paths) < 2:
        return  # nothing beyond check_search_space
    for point in points:
        try:
            spec.recipe.build({path.split(".", 1)[1]: value for path, value in point.items()})
        except ValueError as error:
            at = ", ".join(f"{path}={value!r}" for path, value in point.items())
            raise ValueError(f"search: the recipe with {at} is invalid: {error}") from None


def check_workers(spec: SweepSpec) -> None:
    """With `sweep.workers_per_trial` > 1, every candidate method can train data-parallel and
    every batch size the search allows gives each worker rows of a batch."""
    workers = spec.sweep.workers_per_trial
    if workers == 1:
        return
    for method in spec.candidate_methods():
        try:
            check_data_parallel(DISTILLERS.get(method))
        except ValueError as error:
            raise ValueError(f"sweep.workers_per_trial {workers}: {error}; train it with one worker per trial") \
                from None
    searched = spec.search.get("recipe.batch_size")
    smallest = min(_probe_values(searched)) if searched is not None else spec.recipe.build().batch_size
    if smallest < workers:
        where = "search.recipe.batch_size" if searched is not None else "recipe.batch_size"
        raise ValueError(f"sweep.workers_per_trial {workers}: {where} allows batches of {smallest} images, "
                         "fewer than the workers that share each batch")


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
            arch, argument = spec.student.arch, field.removeprefix("args.")
            _check_values(where, param, lambda v, s=arch, a=argument: arch_args(s.name, {**s.args, a: v}))
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


def check_pretrained(spec: SweepSpec) -> None:
    """A teacher checkpoint, a resolved teacher model and a student's init weights each fit their
    architecture on the spec's data (class count, input channels, every key and shape). Builds
    the dataset once, only when there are such weights."""
    teacher, student = spec.teacher, spec.student
    files = [(f"teacher.checkpoint {teacher.checkpoint}", teacher.arch, teacher.checkpoint, teacher.checkpoint_key,
              False)] if teacher and teacher.checkpoint else []
    if student.init_checkpoint:
        files.append((f"student.init_checkpoint {student.init_checkpoint}", student.arch, student.init_checkpoint,
                      student.checkpoint_key, True))
    resolved = teacher.resolved if teacher else None
    if not files and not resolved:
        return
    try:
        data = DATASETS.get(spec.data.name)(**spec.data.args)
    except (OSError, ValueError) as error:
        raise ValueError(f"data: {error}") from None
    if resolved and int(resolved["num_classes"]) != data.num_classes:
        raise ValueError(f"teacher.model_uri {teacher.model_uri}: the model has {resolved['num_classes']} classes, "
                         f"the data {data.num_classes}")
    for where, arch, path, key, new_head in files:
        model = build_model(arch.name, data.num_classes, data.in_channels, arch.args)
        try:
            load_weights(model, read_state_dict(path, key), where, new_head=new_head)
        except CheckpointError as error:
            raise ValueError(str(error)) from None
