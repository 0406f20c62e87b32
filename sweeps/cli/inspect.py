"""`kdsweep validate` and `kdsweep list`: what a spec will do, and what a spec can name.

`validate` runs the checks `kdsweep run` runs before Ray starts (the spec, its data, every
model on it, this machine's resources) and prints the resolved search space, the methods and
their sources, the stages the sweep will train or reuse from the stage store, and an upper
bound of the training epochs. It writes nothing. `list` reads the registries (after importing
`--plugin` modules, as a spec's `plugins:` does).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sweeps.cli.app import NotFoundError, TrackingUri, app, open_tracker, user_errors
from sweeps.cli.sweep import SpecSets, _pin
from sweeps.dryrun import describe_param, epoch_bound, methods_of, registry_entries, stage_plan
from sweeps.spec import SpecError
from sweeps.tracking import resolve_tracking_uri

if TYPE_CHECKING:  # torch, through the schema and kd_core: imported when a command runs
    from sweeps.spec import SweepSpec

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]




class Kind(StrEnum):
    methods = "methods"
    architectures = "architectures"
    datasets = "datasets"
    recipes = "recipes"


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _param_list(params: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['name']} (required)" if p.get("required") else f"{p['name']}={_value(p['default'])}"
                     for p in params) or "none"


def print_entries(kind: str, entries: list[dict[str, Any]]) -> None:
    """`registry_entries(kind)` as text: one line per entry (its source or doc), one of its parameters."""
    typer.echo(f"{kind} ({len(entries)}):")
    width = max((len(e["name"]) for e in entries), default=0)
    pad = " " * (width + 4)
    for e in entries:
        if kind == "recipes":
            typer.echo(f"  {e['name']:<{width}}  " + ", ".join(f"{k}={_value(v)}" for k, v in e["fields"].items()))
            continue
        about = e.get("source", e.get("doc", ""))
        note = " [internal: a stage of another method, never swept alone]" if e.get("internal_stage") else ""
        typer.echo(f"  {e['name']:<{width}}  {about or e['module']}{note}")
        label = "params" if kind == "methods" else "args"
        typer.echo(f"{pad}{label}: {_param_list(e.get('params', e.get('args', [])))}")




def validation_report(spec: SweepSpec, source: str, storage: Path, address: str | None,
                      tracking_uri: str | None) -> dict[str, Any]:
    """Everything `kdsweep run` checks before Ray starts, then the plan; PreflightError (a
    SpecError) for data, models or resources that fail. Writes nothing."""
    from sweeps.pipeline import input_shape, load_dataset
    from sweeps.preflight import check_before_start, check_experiment

    warnings: list[str] = []
    check_before_start(spec, address, warnings.append)
    uri = resolve_tracking_uri(tracking_uri)
    local = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if local is None or local.is_file():  # an existing store: its experiment must take runs (run creates a new one)
        try:
            check_experiment(open_tracker(uri, reading=True, writes=False), spec.tracking.experiment)
        except NotFoundError:
            pass
    data = load_dataset(spec.data.model_dump())  # loaded by check_before_start: cached in this process
    stages = stage_plan(spec, data, storage)
    searched_method = "method.name" in spec.search
    return {
        "spec": spec.name, "file": source, "valid": True, "warnings": warnings,
        "data": {"name": spec.data.name, "args": spec.data.args, "train": len(data.train), "val": len(data.val),
                 "test": len(data.test), "num_classes": data.num_classes, "input_shape": list(input_shape(data))},
        "search": [describe_param(path, param) for path, param in spec.search.items()],
        "fixed": {**({} if searched_method else {"method.name": spec.method.name}), **spec.method.params},
        "methods": methods_of(spec),
        "stages": stages, "storage": str(storage),
        "sweep": {"num_trials": spec.sweep.num_trials, "max_concurrent": spec.sweep.max_concurrent,
                  "scheduler": spec.sweep.scheduler.type, "sampler": spec.sweep.sampler.type,
                  "objectives": list(spec.sweep.objectives), "device": spec.sweep.device},
        "epochs": epoch_bound(spec, stages),
    }


def print_report(report: dict[str, Any]) -> None:
    """`validation_report` as text."""
    data, sweep, epochs = report["data"], report["sweep"], report["epochs"]
    typer.echo(f"spec {report['spec']} ({report['file']}): valid")
    shape = "x".join(map(str, data["input_shape"]))
    typer.echo(f"data: {data['name']}: {data['train']} train, {data['val']} val, {data['test']} test images, "
               f"{data['num_classes']} classes, input {shape}")
    typer.echo(f"sweep: {sweep['num_trials']} trials, {sweep['max_concurrent']} at a time, {sweep['sampler']} "
               f"sampler, scheduler {sweep['scheduler']}, objectives {', '.join(sweep['objectives'])}, "
               f"on {sweep['device']}")
    typer.echo(f"search space ({len(report['search'])} parameters):")
    width = max(len(p["path"]) for p in report["search"])
    for p in report["search"]:
        typer.echo(f"  {p['path']:<{width}}  {p['text']}")
    if report["fixed"]:
        typer.echo("fixed: " + ", ".join(f"{k}={_value(v)}" for k, v in report["fixed"].items()))
    typer.echo(f"methods ({len(report['methods'])}):")
    width = max(len(m["name"]) for m in report["methods"])
    for m in report["methods"]:
        typer.echo(f"  {m['name']:<{width}}  {m['source'] or m['module']}")
    typer.echo(f"stages (stage store {Path(report['storage']) / 'stages'}):")
    for s in report["stages"]:
        what = f"{s['method']}, {s['epochs']} epochs" if s["epochs"] else s["method"]
        key = s["key"] or "decided later"
        line = f"  {s['status']:<6}  {s['role']:<12} {s['arch']} on {s['data']}, {what}; key {key}"
        typer.echo(f"{line}; for {', '.join(s['for'])}" + (f" ({s['note']})" if s["note"] else ""))
    if not report["stages"]:
        typer.echo("  none")
    typer.echo(f"epochs, at most: {epochs['total']} = {sweep['num_trials']} trials x {epochs['epochs_per_trial']} "
               f"+ {epochs['stages']} for stages to train + {epochs['confirmation']} for confirmation "
               "(ASHA stops trials earlier; retries not counted)")


@app.command()
@user_errors
def validate(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="Sweep spec (YAML).")],
    sets: SpecSets = None,
    storage: Annotated[Path, typer.Option(
        help="Storage root whose stage store is looked in (stages found there are reused).")] = Path("kdsweep_storage"),
    address: Annotated[str | None, typer.Option(
        help="The Ray cluster the sweep will run on: this machine's CPUs and GPUs are then not checked "
             "(the cluster's are, once a sweep connects).")] = None,
    tracking_uri: TrackingUri = None,
    as_json: JsonOption = False,
) -> None:
    """Check a spec as `kdsweep run` does before it starts, print what it will train, and exit (writes nothing)."""
    from sweeps.spec import load_spec

    spec = load_spec(spec_path, lambda s: _pin(s, tracking_uri), sets or ())
    source = f"{spec_path}" + (f" with {len(sets)} --set" if sets else "")
    report = validation_report(spec, source, storage, address, tracking_uri)
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)


@app.command("list")
@user_errors
def list_entries(
    kind: Annotated[Kind, typer.Argument(help="What to list.")],
    plugins: Annotated[list[str] | None, typer.Option(
        "--plugin", metavar="MODULE", help="Import MODULE first, as a spec's `plugins:` does (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the registered methods, architectures, datasets or recipes, with their parameters and defaults."""
    from sweeps.spec import load_plugins

    try:
        load_plugins(plugins or [])
    except ValueError as error:
        raise SpecError(f"--plugin: {str(error).removeprefix('plugins: ')}") from None
    entries = registry_entries(kind.value)
    if as_json:
        typer.echo(json.dumps(entries, indent=2, default=str))
    else:
        print_entries(kind.value, entries)
