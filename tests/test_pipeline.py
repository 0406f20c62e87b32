"""Stage pipelines through the real stage store and MLflow (SQLite): each stage trains once."""

from __future__ import annotations

import pytest

from kd_core.distillers import DISTILLERS
from kd_core.stages import StageStore
from sweeps.pipeline import SweepContext, load_dataset, resolve_stage, trial_sources
from sweeps.sources import source_plan
from sweeps.space import resolve_trial
from sweeps.spec import parse_spec
from sweeps.tracking import Tracker


@pytest.fixture
def sweep(tmp_path, spec_dict):
    spec_dict["method"] = {"name": "dgkd", "params": {"drop_mode": "bernoulli"}}
    spec_dict["teacher"]["recipe"] = {"name": "digits", "epochs": 1}
    spec_dict["recipe"] = {"name": "digits", "epochs": 1}
    spec_dict["search"] = {"method.num_assistants": {"type": "int", "low": 0, "high": 3}}
    spec = parse_spec(spec_dict)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_sweep(tracker.experiment_id("pipeline"), "pipeline", {})
    context = SweepContext("pipeline", spec, str(tmp_path), tracker.uri, parent)
    return spec, tracker, context


def test_dgkd_trains_each_stage_once_across_assistant_counts(sweep, tmp_path) -> None:
    spec, tracker, context = sweep
    data = load_dataset(spec.data.model_dump())
    for n in (1, 3, 2, 3, 1):  # trials using 1..3 assistants, in any order
        plan = resolve_trial(spec, {"method.num_assistants": n})
        sources = trial_sources(spec, plan, data, context, tracker, "cpu")
        assert [s.stage.role for s in sources] == ["teacher"] + ["assistant"] * n
    stored = [p for p in (tmp_path / "stages").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(stored) == 4  # teacher + 3 assistants
    runs = tracker.children(context.parent_run_id)
    assert sorted(r.data.tags["kdsweep.role"] for r in runs) == ["assistant"] * 3 + ["teacher"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # lineage: A_i records its parents T, A1..A(i-1)
    by_key = {r.data.tags["kdsweep.stage_key"]: r for r in runs}
    plan = resolve_trial(spec, {"method.num_assistants": 3})
    stages = DISTILLERS.get("dgkd").source_stages(plan.params, source_plan(spec, 10, (1, 8, 8)))
    third = by_key[stages[3].key]
    assert third.data.tags["kdsweep.teacher_run_id"] == by_key[stages[0].key].info.run_id
    assert third.data.tags["kdsweep.assistant_2_run_id"] == by_key[stages[2].key].info.run_id


def test_a_stored_stage_is_reused_by_a_later_sweep(sweep, tmp_path) -> None:
    spec, tracker, context = sweep
    teacher = source_plan(spec, 10, (1, 8, 8)).teacher
    first = resolve_stage(teacher, context, tracker)
    later = SweepContext("later", context.spec, context.storage, tracker.uri,
                         tracker.start_sweep(tracker.experiment_id("pipeline"), "later", {}))
    again = resolve_stage(teacher, later, tracker)
    assert again.record.key == first.record.key and again.record.run_id == first.record.run_id
    assert tracker.children(later.parent_run_id) == []  # nothing trained for the later sweep
    assert StageStore(tmp_path).get(teacher.key) is not None


@pytest.mark.parametrize("how", ["truncated", "other_arch", "no_weights", "legacy_other_arch"])
def test_a_damaged_teacher_is_trained_again_by_a_later_sweep(sweep, tmp_path, how, monkeypatch) -> None:
    """A damaged stage never poisons later sweeps: the next one that needs it sets it aside (named
    in damage.txt) and trains it again, as a run of its own."""
    from tests.test_stages import damage

    spec, tracker, context = sweep
    teacher = source_plan(spec, 10, (1, 8, 8)).teacher
    first = resolve_stage(teacher, context, tracker)
    damage(first.record.path, how)
    monkeypatch.setattr("sweeps.pipeline._models", {})  # a new worker process
    later = SweepContext("later", context.spec, context.storage, tracker.uri,
                         tracker.start_sweep(tracker.experiment_id("pipeline"), "later", {}))
    again = resolve_stage(teacher, later, tracker)
    assert again.record.key == first.record.key and again.record.run_id != first.record.run_id
    (run,) = tracker.children(later.parent_run_id, "teacher")
    assert run.info.status == "FINISHED"
    (aside,) = [p for p in (tmp_path / "stages").iterdir() if ".corrupt-" in p.name]
    assert (aside / "damage.txt").exists()
    assert StageStore(tmp_path).get(teacher.key) is not None


def test_a_worker_keeps_its_imports_out_of_garbage_collection_once(spec_dict) -> None:
    """`worker_setup` freezes what a worker's imports made, once per process (later trials'
    garbage stays collectable); the driver's objects are left alone. In a subprocess: freezing
    is for the whole process."""
    import json
    import subprocess
    import sys

    script = f"""
import gc, json
from sweeps.pipeline import worker_setup
from sweeps.spec import parse_spec
spec = parse_spec(json.loads({json.dumps(spec_dict)!r}))
worker_setup(spec, driver=True)
driver = gc.get_freeze_count()
worker_setup(spec)
first = gc.get_freeze_count()
garbage = [[] for _ in range(1000)]
worker_setup(spec)
print(driver, first, gc.get_freeze_count())
"""
    counts = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    driver, first, again = map(int, counts.stdout.split())
    assert driver == 0 and first > 100_000 and again == first
