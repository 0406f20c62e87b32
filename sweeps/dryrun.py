"""What a spec can name and what it will do, without running anything: the registries' entries
with their parameters and defaults, each searched parameter resolved, the candidate methods and
their sources, the stages a sweep will train or reuse, and an upper bound of its epochs (read by
`kdsweep list` and `kdsweep validate`)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kd_core.data import Dataset
    from kd_core.stages import StageSpec, StageStore
    from sweeps.spec import ParamSpec, SweepSpec

MAX_INT_VALUES = 16  # an int parameter with more values is probed at its ends only (stage plans)
MAX_PROBES = 512  # combinations of probed values per method; beyond, each parameter alone

# ---------------------------------------------------------------- describing registry entries

def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph as one line ("" for none)."""
    paragraph = (inspect.cleandoc(doc or "").split("\n\n") or [""])[0]
    return " ".join(paragraph.split())


def method_source(cls: type) -> str:
    """Where a method comes from: the first paragraph of its module's docstring (one file per
    method: the paper and the official code it follows), else of its class's."""
    module = sys.modules.get(cls.__module__)
    return first_paragraph(getattr(module, "__doc__", None)) or first_paragraph(cls.__doc__)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def method_params(cls: Any) -> list[dict[str, Any]]:
    """A method's parameters: name, type and default (`Params` dataclass fields)."""
    return [{"name": f.name, "type": _type_name(f.type), "default": _default(f)}
            for f in dataclasses.fields(cls.Params)]


def factory_params(factory: Any, fixed: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A factory's arguments a spec may set: name, type and default (`required` when none)."""
    rows = []
    for name, p in inspect.signature(factory).parameters.items():
        if name in fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        row = {"name": name, "type": _type_name(p.annotation)}
        row.update({"required": True} if p.default is p.empty else {"default": p.default})
        rows.append(row)
    return rows


def registry_entries(kind: str) -> list[dict[str, Any]]:
    """Every registered entry of `kind` (methods, architectures, datasets, recipes) with its
    parameters and defaults, by name."""
    if kind == "methods":
        from kd_core.distillers import DISTILLERS

        return [{"name": name, "module": DISTILLERS.get(name).__module__, "class": DISTILLERS.get(name).__name__,
                 "source": method_source(DISTILLERS.get(name)), "internal_stage": DISTILLERS.get(name).internal_stage,
                 "params": method_params(DISTILLERS.get(name))} for name in DISTILLERS]
    if kind == "architectures":
        from kd_core.models import MODELS

        return [{"name": name, "module": MODELS.get(name).__module__, "doc": first_paragraph(MODELS.get(name).__doc__),
                 "args": factory_params(MODELS.get(name), ("num_classes", "in_channels"))} for name in MODELS]
    if kind == "datasets":
        from kd_core.data import DATASETS

        return [{"name": name, "module": DATASETS.get(name).__module__,
                 "doc": first_paragraph(DATASETS.get(name).__doc__), "args": factory_params(DATASETS.get(name))}
                for name in DATASETS]
    from kd_core.recipes import RECIPES

    return [{"name": name, "fields": RECIPES.get(name).as_dict()} for name in RECIPES]


# ---------------------------------------------------------------- what a spec will do

def describe_param(path: str, param: ParamSpec) -> dict[str, Any]:
    """One searched parameter as resolved (its type filled in) and as a line of text."""
    if param.type == "categorical":
        text = f"categorical, one of {param.choices}"
    else:
        cast = int if param.type == "int" else float
        text = f"{param.type} in [{cast(param.low):g}, {cast(param.high):g}]"
        text += ", log scale" if param.log else ""
        text += f", step {param.step:g}" if param.step is not None else ""
    if param.when:
        text += "; only when " + " and ".join(
            f"{k} in {v}" if isinstance(v, list) else f"{k} = {v}" for k, v in param.when.items())
    return {"path": path, **param.model_dump(exclude_none=True), "text": text}


def _applies(param: ParamSpec, method: str) -> bool:
    allowed = param.when.get("method.name", [method])
    return method in (allowed if isinstance(allowed, list) else [allowed])


def _probe_values(param: ParamSpec) -> list[Any]:
    """The values a stage plan is probed at: every choice, every int value (up to
    MAX_INT_VALUES), the ends of other ranges. Searched values change a method's source stages
    only through structure (how many assistants), never their keys (`Distiller.source_stages`)."""
    if param.type == "categorical":
        return list(param.choices or [])
    if param.type == "int":
        step = int(param.step or 1)
        values = list(range(int(param.low), int(param.high) + 1, step))
        return values if len(values) <= MAX_INT_VALUES else [int(param.low), int(param.high)]
    return [param.low, param.high]


def _probes(spec: SweepSpec, method: str) -> list[dict[str, Any]]:
    """Points {searched path: value} of the paths that can shape `method`'s source stages: its
    searched parameters and the student's searched arguments; every combination, or each path
    alone beyond MAX_PROBES."""
    paths = {path: _probe_values(param) for path, param in spec.search.items()
             if (path.startswith("method.") and path != "method.name" and _applies(param, method))
             or path.startswith("student.args.")}
    count = 1
    for values in paths.values():
        count *= max(1, len(values))
    if count <= MAX_PROBES:
        return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*paths.values())]
    return [{}] + [{path: value} for path, values in paths.items() for value in values]


def source_stages_of(spec: SweepSpec, data: Dataset) -> dict[str, tuple[StageSpec, list[str]]]:
    """Every frozen source stage some trial may learn from, by key, with the methods that use it."""
    from kd_core.distillers import DISTILLERS
    from sweeps.pipeline import input_shape
    from sweeps.sources import source_plan
    from sweeps.spec.coerce import dataclass_from_dict

    shape = input_shape(data)
    found: dict[str, tuple[StageSpec, list[str]]] = {}
    for method in spec.candidate_methods():
        cls = DISTILLERS.get(method)
        for probe in _probes(spec, method):
            values = {path.split(".", 1)[1]: v for path, v in probe.items() if path.startswith("method.")}
            student = spec.student.arch.model_dump()
            student["args"] = {**student["args"], **{path.removeprefix("student.args."): v
                                                     for path, v in probe.items() if path.startswith("student.args.")}}
            try:
                params = dataclass_from_dict(cls.Params, {**spec.fixed_params(method), **values})
                stages = cls.source_stages(params, source_plan(spec, data.num_classes, shape, student))
            except ValueError:  # a combination the search never samples together (checked alone by the spec)
                continue
            for stage in stages:
                users = found.setdefault(stage.key, (stage, []))[1]
                if method not in users:
                    users.append(method)
    return found


def _stage_status(store: StageStore, stage: StageSpec) -> tuple[str, str]:
    """("reuse", where) for a stage in the store, ("train"/"import", why) otherwise: "import" is
    a pretrained stage, evaluated once and never trained."""
    from kd_core.stages import CorruptStageError

    try:
        record = store.get(stage.key)
    except CorruptStageError as error:
        return "train", f"the stored copy is damaged ({error.problem}): set aside and trained again"
    if record is not None:
        return "reuse", f"found in {record.path}"
    return ("train", "") if stage.trained else ("import", "pretrained: evaluated once, never trained")


def _arch_label(arch: dict[str, Any]) -> str:
    return f"{arch['name']}({','.join(f'{k}={v}' for k, v in sorted(arch.get('args', {}).items()))})"


def stage_plan(spec: SweepSpec, data: Dataset, storage: Path) -> list[dict[str, Any]]:
    """The stages the sweep will train, import or reuse from the stage store under `storage`,
    parents first: every trial's frozen sources (a stored stage's own parents are not needed),
    then the CE-only baseline student. Reads the store, writes nothing."""
    from kd_core.stages import StageStore
    from sweeps.sources import baseline_stage

    store = StageStore(storage)
    rows: dict[str, dict[str, Any]] = {}

    def visit(stage: StageSpec, users: list[str]) -> None:
        if stage.key in rows:
            rows[stage.key]["for"] += [u for u in users if u not in rows[stage.key]["for"]]
            return
        status, note = _stage_status(store, stage)
        if status != "reuse":  # its parents are needed only to train it
            for parent in stage.parents:
                visit(parent, [f"{stage.role} {stage.key[:8]}"])
        rows[stage.key] = {
            "role": stage.role, "key": stage.key, "status": status, "note": note, "for": list(users),
            "arch": _arch_label(stage.arch), "method": stage.method["name"] if stage.trained else "pretrained",
            "data": stage.data["name"], "epochs": stage.recipe["epochs"] if stage.trained else 0,
            "parents": [p.key for p in stage.parents],
        }

    for stage, users in source_stages_of(spec, data).values():
        visit(stage, users)
    searched = [p for p in spec.search if p.startswith(("recipe.", "student.args."))]
    baseline = baseline_stage(spec, spec.recipe.build(), spec.student.arch.model_dump())
    if searched:  # its recipe and architecture are the best trial's: known only after the trials
        rows["baseline"] = {
            "role": "baseline", "key": None, "status": "train", "for": ["comparison"],
            "note": f"after the trials, with the best trial's {', '.join(searched)}",
            "arch": _arch_label(baseline.arch), "method": "ce", "data": baseline.data["name"],
            "epochs": _trial_epochs(spec), "parents": [],
        }
    else:
        visit(baseline, ["comparison"])
    return list(rows.values())


def _trial_epochs(spec: SweepSpec) -> int:
    """The most epochs one trial trains: recipe.epochs, or the largest searched value."""
    param = spec.search.get("recipe.epochs")
    if param is None:
        return spec.recipe.build().epochs
    return int(max(param.choices) if param.type == "categorical" else param.high)


def epoch_bound(spec: SweepSpec, stages: list[dict[str, Any]]) -> dict[str, int]:
    """An upper bound of the epochs the sweep trains: every trial to its last epoch (ASHA stops
    some earlier), every stage to train, every confirmation run. Retries after failures
    (`sweep.max_failures`) resume from a checkpoint and are not counted."""
    per_trial, settings = _trial_epochs(spec), spec.sweep
    trials = settings.num_trials * per_trial
    trained = sum(s["epochs"] for s in stages if s["status"] == "train")
    confirm = min(settings.confirm.top_k, settings.num_trials) * settings.confirm.seeds * per_trial
    return {"trials": trials, "epochs_per_trial": per_trial, "stages": trained, "confirmation": confirm,
            "total": trials + trained + confirm}


def methods_of(spec: SweepSpec) -> list[dict[str, Any]]:
    """The candidate methods: where each comes from and its parameters with the spec's fixed values."""
    from kd_core.distillers import DISTILLERS

    rows = []
    for name in spec.candidate_methods():
        cls = DISTILLERS.get(name)
        fixed = spec.fixed_params(name)
        params = {p["name"]: fixed.get(p["name"], p["default"]) for p in method_params(cls)}
        rows.append({"name": name, "source": method_source(cls), "module": cls.__module__,
                     "params": params, "fixed": sorted(fixed)})
    return rows
