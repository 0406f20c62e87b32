"""Spec validation: every error names the offending field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sweeps.spec import SpecError, load_spec, parse_spec

SPECS = sorted((Path(__file__).parent.parent / "sweeps" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_specs_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.search


def test_valid_spec_resolves_defaults(spec_dict) -> None:
    spec = parse_spec(spec_dict)
    assert spec.registered_model == "unit-student"
    assert spec.teacher_recipe.build().epochs == 2
    assert spec.recipe.build().epochs == 3
    assert spec.sweep.sampler.type == "tpe" and spec.sweep.scheduler.type == "asha"


def test_values_are_coerced_to_their_types(spec_dict) -> None:
    spec_dict["student"]["arch"]["args"]["width"] = "6"
    spec_dict["method"]["params"]["T"] = "2.5"
    spec = parse_spec(spec_dict)
    assert spec.student.arch.args["width"] == 6
    assert spec.method.params["T"] == 2.5


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


BAD = [
    ("colour", "red", "colour: Extra inputs are not permitted"),
    ("sweep/num_trials", "many", "sweep.num_trials: Input should be a valid integer"),
    ("sweep/num_trials", 0, "sweep.num_trials: Input should be greater than or equal to 1"),
    ("sweep/max_concurrent", -2, "sweep.max_concurrent"),
    ("student/arch/name", "resnet9", "student.arch.name: unknown architecture 'resnet9'"),
    ("student/arch/args", {"width": 0}, "student.arch.args: width and depth must be at least 1"),
    ("student/arch/args", {"heads": 4}, "student.arch.args: unknown argument 'heads' (known: width, depth)"),
    ("student/arch/args", {"width": "wide"}, "student.arch.args: width: Input should be a valid integer"),
    ("method/name", "fitnet", "method.name: unknown method 'fitnet'"),
    ("method/params", {"T": -1}, "method.params: T must be > 0"),
    ("method/params", {"alpha": 0.5}, "method.params: unknown parameter 'alpha'"),
    ("recipe", {"name": "digits", "epochs": -5}, "recipe: epochs must be >= 1, got -5"),
    ("recipe", {"name": "fast"}, "recipe.name: unknown recipe 'fast'"),
    ("recipe", {"name": "digits", "lr": "quick"}, "recipe: lr: Input should be a valid number"),
    ("data", {"name": "mnist"}, "data.name: unknown dataset 'mnist'"),
    ("data", {"val_fraction": 1.5}, "data: val_fraction: Input should be less than 1"),
    ("data", {"fraction": 0.5}, "data: unknown argument 'fraction' (known: seed, val_fraction, test_fraction)"),
    ("search", {}, "search: the search space is empty"),
    ("search", {"student.width": {"low": 2, "high": 8}}, "search.student.width: searchable paths start with"),
    ("search", {"method.T": {"low": 5, "high": 1}}, "search.method.T: low (5.0) must be below high (1.0)"),
    ("search", {"method.alpha": {"low": 0, "high": 1}}, "search.method.alpha: method kd has no parameter 'alpha'"),
    ("search", {"method.T": {"low": 1}}, "search.method.T: a numeric parameter needs both 'low' and 'high'"),
    ("search", {"method.T": {"low": 0.0, "high": 4, "log": True}}, "search.method.T: a log-scaled parameter needs low > 0"),
    ("search", {"method.T": {"low": 0.0, "high": 4}}, "search.method.T: value 0.0 is invalid: T must be > 0"),
    ("search", {"method.kl_reduction": {"choices": ["sum"]}}, "search.method.kl_reduction: value 'sum' is invalid"),
    ("search", {"recipe.lr": {"low": -1, "high": 1}}, "search.recipe.lr: value -1.0 is invalid: lr must be > 0"),
    ("search", {"method.name": {"choices": ["kd", "fitnet"]}}, "search.method.name: unknown method 'fitnet'"),
    ("search", {"method.name": {"choices": ["kd", "ce"]}, "method.T": {"low": 1, "high": 4}},
     "search.method.T: method ce has no parameter 'T'"),
    ("search", {"method.T": {"low": 1, "high": 4, "when": {"method.w_kd": 0.5}}},
     "search.method.T.when: 'method.w_kd' must be a parameter listed before"),
    ("search", {"method.T": {"low": 1, "high": 4, "when": {"method.name": "kd"}}, "method.name": {"choices": ["kd", "ce"]}},
     "search.method.T.when: 'method.name' must be a parameter listed before 'method.T'"),
    ("search", {"method.T": {"type": "int", "low": 1.5, "high": 4}}, "search.method.T: an int parameter needs whole-number"),
    ("teacher", None, "method kd: needs a teacher (add a 'teacher' section)"),
    ("name", "my sweep!", "name: use letters, digits"),
    ("sweep", {"objectives": ["accuracy", "params"]}, "a multi-objective sweep cannot use ASHA"),
    ("sweep", {"objectives": ["params"]}, "objectives: [accuracy] or [accuracy, params | flops | latency]"),
    ("search", {"student.args.width": {"type": "int", "low": 0, "high": 4}},
     "search.student.args.width: value 0 is invalid: width and depth must be at least 1"),
    ("sweep/initial_points", [{"method.Z": 1}], "sweep.initial_points.0: 'method.Z' is not a searched parameter"),
    ("sweep/initial_points", [{"method.T": 50}], "sweep.initial_points.0: method.T=50 is outside [1.0, 10.0]"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_invalid_specs_name_the_field(spec_dict, path: str, value: Any, message: str) -> None:
    set_path(spec_dict, path, value)
    with pytest.raises(SpecError) as error:
        parse_spec(spec_dict)
    assert message in str(error.value)


def test_conditional_parameters_are_valid(spec_dict) -> None:
    spec_dict["search"] = {
        "method.name": {"choices": ["kd", "ce"]},
        "method.T": {"low": 1, "high": 4, "when": {"method.name": "kd"}},
        "method.w_ce": {"low": 0.1, "high": 1.0},  # both methods have w_ce
    }
    assert parse_spec(spec_dict).candidate_methods() == ["kd", "ce"]


def test_file_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad_yaml)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(scalar)
