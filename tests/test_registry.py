"""Registered students against a real MLflow registry (SQLite): a sweep's recorded model URI is
pinned to its version and keeps meaning that student; `champion` moves only by the stated rule."""

from __future__ import annotations

import copy

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from kd_core.models import build_model
from kd_core.train import evaluate
from sweeps import tags
from sweeps.export import ALIAS, champion_decision, data_key, export_student, load_registered
from sweeps.tracking import Tracker

MODEL = "reg_student"
ARCH = {"name": "convnet", "args": {"width": 2, "depth": 1}}
DATA = {"name": "digits", "seed": 0}


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def export(tracker: Tracker, tmp_path, digits, sweep: str, val_acc: float, seed: int, data=DATA, rule="better"):
    torch.manual_seed(seed)
    model = build_model(ARCH["name"], 10, 1, ARCH["args"])
    parent = tracker.start_sweep(tracker.experiment_id("registry"), sweep, {})
    meta = {"sweep": sweep, "val_acc": val_acc, "data": data, "arch": ARCH}
    return export_student(model, digits, tmp_path / sweep, tracker, parent, MODEL, meta, rule), parent


def champion_version(tracker: Tracker) -> str:
    return str(tracker.client.get_model_version_by_alias(MODEL, ALIAS).version)


def test_a_recorded_uri_keeps_meaning_its_student_and_a_worse_one_does_not_take_champion(
        tracker, tmp_path, digits) -> None:
    first, _ = export(tracker, tmp_path, digits, "first", val_acc=0.90, seed=0)
    second, _ = export(tracker, tmp_path, digits, "second", val_acc=0.12, seed=1)
    assert (first.model_uri, second.model_uri) == (f"models:/{MODEL}/1", f"models:/{MODEL}/2")
    assert first.champion.startswith("promoted") and not second.champion.startswith("promoted")
    assert champion_version(tracker) == "1"  # a 12% student does not take champion
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    for result in (first, second):  # each sweep's URI loads that sweep's student, whatever registered later
        assert evaluate(load_registered(result.model_uri), digits.test)[1] == result.test_acc
    assert first.test_acc != second.test_acc
    version = tracker.client.get_model_version(MODEL, "2")
    assert version.tags[tags.SWEEP] == "second" and float(version.tags[tags.VAL_ACC]) == 0.12
    assert version.tags[tags.DATA_KEY] == data_key(DATA)


def registered(tracker: Tracker, val_acc: float, data=DATA) -> str:
    """A registered version with the tags an export writes (no files: the rule reads tags only)."""
    client = tracker.client
    if not client.search_registered_models(f"name='{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, "/nonexistent/student").version
    client.set_model_version_tag(MODEL, version, tags.VAL_ACC, repr(val_acc))
    client.set_model_version_tag(MODEL, version, tags.DATA_KEY, data_key(data))
    client.set_registered_model_alias(MODEL, ALIAS, version)
    return version


def test_the_champion_rule(tracker) -> None:
    client, same = tracker.client, data_key(DATA)
    assert champion_decision(client, MODEL, 0.5, same, "better") == (True, f"promoted: the first champion of {MODEL}")
    registered(tracker, 0.9)
    assert champion_decision(client, MODEL, 0.95, same, "better")[0]  # beats it on the same data
    assert not champion_decision(client, MODEL, 0.9, same, "better")[0]  # a tie keeps the champion
    assert not champion_decision(client, MODEL, 0.8, same, "better")[0]
    other = champion_decision(client, MODEL, 0.99, data_key({**DATA, "seed": 1}), "better")
    assert not other[0] and "other data" in other[1]  # another split's accuracy is not comparable
    assert champion_decision(client, MODEL, 0.1, same, "always")[0]  # asked
    assert not champion_decision(client, MODEL, 0.99, same, "never")[0]


def test_promote_moves_champion_when_asked(tracker, tmp_path, digits, monkeypatch) -> None:
    from sweeps.cli import app

    export(tracker, tmp_path, digits, "good", val_acc=0.9, seed=0)
    _, parent = export(tracker, tmp_path, digits, "poor", val_acc=0.5, seed=1)
    tracker.set_tags(parent, {tags.MODEL_URI: f"models:/{MODEL}/2", tags.MODEL_VERSION: "2"})  # as finish records
    assert champion_version(tracker) == "1"
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["promote", "poor", "--tracking-uri", tracker.uri])
    assert done.exit_code == 0, done.output
    assert champion_version(tracker) == "2"
    assert "promoted by hand" in tracker.client.get_run(parent).data.tags[tags.CHAMPION]


def test_a_pinned_teacher_refuses_files_that_are_not_the_registered_ones(tracker, tmp_path, digits) -> None:
    from sweeps.pretrained import pin_teacher
    from sweeps.spec import SpecError, parse_spec
    from tests.conftest import BASE_SPEC

    result, parent = export(tracker, tmp_path, digits, "teacher", val_acc=0.9, seed=0)
    spec = copy.deepcopy(BASE_SPEC)
    spec["teacher"] = {"model_uri": f"models:/{MODEL}@{ALIAS}"}
    pinned = parse_spec(spec, resolve=lambda s: pin_teacher(s, tracker))
    assert pinned.teacher.resolved["model_uri"] == f"models:/{MODEL}/1"  # pinned, not the alias
    torch.manual_seed(5)  # the run exports another student over its files
    other = tmp_path / "other"
    other.mkdir()
    torch.save(build_model(ARCH["name"], 10, 1, ARCH["args"]).state_dict(), other / "student_state_dict.pt")
    tracker.client.log_artifact(parent, str(other / "student_state_dict.pt"), "export")
    with pytest.raises(SpecError, match="not the ones registered"):
        parse_spec(spec, resolve=lambda s: pin_teacher(s, tracker))
