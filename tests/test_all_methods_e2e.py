"""The all-methods digits spec, on a short budget, through real Ray Tune, Optuna and MLflow:
every method runs (one initial point each), every derived stage trains once, lineage is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_core.distillers import DISTILLERS
from sweeps import tags
from tests.sweep_cli import run_spec

ROOT = Path(__file__).resolve().parent.parent
# Every method kdsweep ships that is swept on its own (by the registry, never a list of names).
METHODS = [name for name in DISTILLERS.names()
           if DISTILLERS.get(name).__module__.startswith("kd_core.") and not DISTILLERS.get(name).internal_stage]


def test_the_all_methods_spec_offers_every_method() -> None:
    spec = yaml.safe_load((ROOT / "sweeps/specs/digits_all_methods.yaml").read_text())
    assert sorted(spec["search"]["method.name"]["choices"]) == sorted(METHODS)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    spec = yaml.safe_load((ROOT / "sweeps/specs/digits_all_methods.yaml").read_text())
    spec["teacher"]["recipe"]["epochs"] = 2
    spec["recipe"]["epochs"] = 2
    spec["method"]["params"].update(lw_epochs=1, stage1_epochs=1)
    points = [{"method.name": m} for m in METHODS]
    for point in points:
        if point["method.name"] in ("takd", "dgkd"):
            point["method.num_assistants"] = 2
    spec["sweep"].update(num_trials=len(METHODS), initial_points=points,
                         scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2})
    swept = run_spec(tmp_path_factory.mktemp("all_methods"), spec, "all", timeout=1200)
    tracker, parent = swept["tracker"], swept["parent"]
    return {"tracker": tracker, "parent": parent, "children": tracker.children(parent.info.run_id)}


def test_every_method_ran_and_ended_cleanly(sweep) -> None:
    trials = [r for r in sweep["children"] if r.data.tags[tags.ROLE] == "trial"]
    assert sorted(r.data.params["method"] for r in trials) == sorted(METHODS)
    assert all(r.info.status in ("FINISHED", "KILLED") for r in sweep["children"])
    assert sweep["parent"].info.status == "FINISHED"
    assert "kdsweep.model_uri" in sweep["parent"].data.tags


def test_every_trial_finished_or_was_stopped_by_asha_and_logged_every_term(sweep) -> None:
    for run in (r for r in sweep["children"] if r.data.tags[tags.ROLE] == "trial"):
        method = run.data.params["method"]
        if run.info.status == "KILLED":
            assert run.data.tags[tags.END_REASON].startswith("stopped early by the scheduler"), method
        else:
            assert run.info.status == "FINISHED" and tags.END_REASON not in run.data.tags, method
        terms = DISTILLERS.get(method).make_params().weights()
        assert {f"train_loss_{term}" for term in terms} <= set(run.data.metrics), method


def test_each_derived_stage_trained_once(sweep) -> None:
    roles = sorted(r.data.tags[tags.ROLE] for r in sweep["children"] if r.data.tags[tags.ROLE] != "trial")
    # teacher; 2 DGKD + 2 TAKD assistants; the SFTN teacher; LW-KD's teacher; the CE baseline
    assert roles == ["assistant"] * 4 + ["baseline", "lw_teacher", "sftn_teacher", "teacher"]
    keys = [r.data.tags["kdsweep.stage_key"] for r in sweep["children"] if "kdsweep.stage_key" in r.data.tags]
    assert len(keys) == len(set(keys))


def test_lineage_of_assistant_methods(sweep) -> None:
    by_method = {r.data.params["method"]: r for r in sweep["children"] if r.data.tags[tags.ROLE] == "trial"}
    dgkd, takd = by_method["dgkd"].data.tags, by_method["takd"].data.tags
    assert {"kdsweep.teacher_run_id", "kdsweep.assistant_1_run_id", "kdsweep.assistant_2_run_id"} <= set(dgkd)
    # TAKD learns from its immediate parent only: the last assistant, whose own parent is A1.
    assert "kdsweep.teacher_run_id" not in takd and "kdsweep.assistant_2_run_id" not in takd
    last = sweep["tracker"].client.get_run(takd["kdsweep.assistant_1_run_id"])
    first = sweep["tracker"].client.get_run(last.data.tags["kdsweep.assistant_1_run_id"])
    assert first.data.tags["kdsweep.teacher_run_id"] == dgkd["kdsweep.teacher_run_id"]
    assert "kdsweep.sftn_teacher_run_id" in by_method["sftn"].data.tags
    assert "kdsweep.lw_teacher_run_id" in by_method["lwkd"].data.tags
