"""A trial's epochs reach MLflow and Tune on a reporting thread (sweeps/reporting.py): every epoch
once, checkpoints of the state the epoch ended with, no epoch trained past a scheduler's stop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_core.recipes import build_recipe
from kd_core.train import EpochReport, fit, load_checkpoint
from sweeps.child_runs import TrackedRun
from sweeps.reporting import EpochReporter, decision_epochs
from sweeps.spec import SweepSpec
from sweeps.timings import DRIVER_CPU, PhaseTimes, driver_part
from sweeps.tracking import Tracker
from tests.test_train import ce_distiller


@pytest.mark.parametrize(("epochs", "grace", "factor"), [(60, 3, 2.0), (8, 1, 2), (9, 1, 3), (100, 3, 2.5), (10, 3, 3),
                                                         (3, 3, 2), (40, 2, 4.5)])
def test_decision_epochs_are_where_ray_asha_decides(spec_dict, epochs, grace, factor) -> None:
    from ray.tune.schedulers import ASHAScheduler

    spec_dict["recipe"]["epochs"] = epochs
    spec_dict["sweep"] = {"scheduler": {"type": "asha", "grace_period": grace, "reduction_factor": factor}}
    asha = ASHAScheduler(max_t=epochs, grace_period=grace, reduction_factor=factor)
    # ASHA decides at the first result at or past a rung (async_hyperband.py: cur_iter < milestone)
    rungs = {math.ceil(milestone) for milestone, _ in asha._brackets[0]._rungs}
    assert decision_epochs(SweepSpec.model_validate(spec_dict)) == rungs


def test_a_fifo_sweep_has_no_decision_epochs(spec_dict) -> None:
    spec_dict["sweep"] = {"scheduler": {"type": "none"}}
    assert decision_epochs(SweepSpec.model_validate(spec_dict)) == frozenset()


def test_a_frozen_report_saves_the_state_its_epoch_ended_with(digits, tmp_path) -> None:
    reports: list[tuple[EpochReport, EpochReport]] = []

    def keep(report: EpochReport) -> None:
        if report.epoch == 1:
            report.save(tmp_path / "at_once")  # what a blocking report would have written
        reports.append((report, report.frozen()))

    fit(ce_distiller(), digits, build_recipe("digits", {"epochs": 3}), callback=keep)
    first_live, first_frozen = reports[0]
    first_frozen.save(tmp_path / "later")  # saved after two more epochs trained
    first_live.save(tmp_path / "live")
    at_once, later = load_checkpoint(tmp_path / "at_once"), load_checkpoint(tmp_path / "later")
    assert later["epoch"] == at_once["epoch"] == 1
    for key, value in at_once["model"].items():
        torch.testing.assert_close(later["model"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(later["rng"], at_once["rng"], rtol=0, atol=0)
    assert later["optimizer"]["state"].keys() == at_once["optimizer"]["state"].keys()
    live = load_checkpoint(tmp_path / "live")
    assert any(not torch.equal(live["model"][k], v) for k, v in at_once["model"].items())  # the live one moved on


def _trial_run(config: dict[str, Any], trial_id: str) -> TrackedRun:
    """The trial's child run of `config["parent"]`, opened (or reopened) by trial id."""
    tracker = Tracker(config["uri"])
    return TrackedRun(tracker, tracker.open_child(config["parent"], "trial", "kdsweep.trial_id", trial_id,
                                                  trial_id, {}, {}))


def _tune_fit(trainable: Any, config: dict[str, Any], tmp_path: Path, num_cpus: int, tune_config: Any,
              **run_config: Any) -> Any:
    """`trainable` over `config` with real Tune on a Ray of `num_cpus` CPUs (started here and shut
    down after, unless one runs already): its `ResultGrid`, with no trial errors."""
    import ray
    from ray import tune

    from cluster.session import init_ray

    started = init_ray(None, num_cpus=num_cpus)
    try:
        results = tune.Tuner(trainable, param_space=config, tune_config=tune_config, run_config=tune.RunConfig(
            storage_path=str(tmp_path / "storage"), verbose=0, **run_config)).fit()
    finally:
        if started:
            ray.shutdown()
    assert not results.errors
    return results


def _reported_trial(config: dict[str, Any]) -> None:
    """A Tune trial whose "training" is a loop of epochs through `EpochReporter`, recording what it trained."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run = _trial_run(config, trial_id)
    trained = Path(config["log"]) / f"{trial_id}.json"
    epochs: list[int] = []
    weight = torch.zeros(3)
    with EpochReporter(run, {"cost": 1.0}, config["decisions"], PhaseTimes(), config["interval"],
                       config["interval"]) as reporter:
        for epoch in range(1, config["epochs"] + 1):
            weight += 1  # in place, as training does: a checkpoint must hold this epoch's value
            epochs.append(epoch)
            trained.write_text(json.dumps({"epochs": epochs, "run": run.run_id}))
            score = config["quality"] * epoch
            reporter(EpochReport(epoch, {"score": score}, epoch == config["epochs"],
                                 lambda epoch=epoch, weight=weight: {"epoch": epoch, "weight": weight}))
    run.flush()


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_tune_sees_its_epochs_once_and_a_stopped_trial_trains_no_further(tmp_path, interval) -> None:
    """Every epoch (interval 0) or only the decision epochs and the last (an interval longer
    than the trial) reach Tune, as `training_iteration` = epoch; ASHA stops the weak trials at a
    rung, where they stopped training; MLflow has every epoch trained, once."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sweeps.callbacks import JsonResults

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracker.start_sweep(tracker.experiment_id("reporting"), "reporting", {})
    decisions = frozenset({1, 2, 4})  # ASHA(max_t=8, grace 1, factor 2) without the last epoch
    config = {"uri": tracker.uri, "parent": parent, "log": str(tmp_path), "epochs": 8, "decisions": decisions,
              "interval": interval, "quality": tune.grid_search([1.0, 0.1, 0.5, 0.05])}
    results = _tune_fit(_reported_trial, config, tmp_path, 2, tune.TuneConfig(
        metric="score", mode="max", max_concurrent_trials=1, reuse_actors=True,
        scheduler=ASHAScheduler(max_t=8, grace_period=1, reduction_factor=2)), name="reporting", callbacks=[JsonResults()])
    stopped = 0
    for result in results:
        reported = int(result.metrics["training_iteration"])
        trial = json.loads((tmp_path / f"{result.metrics['trial_id']}.json").read_text())
        assert trial["epochs"] == list(range(1, reported + 1))  # trained exactly what Tune saw, not one more
        stopped += reported < 8
        seen = [json.loads(line)["training_iteration"] for line in (Path(result.path) / "result.json").open()]
        due = range(1, reported + 1) if interval == 0 else sorted({*decisions, 8})
        assert seen == [epoch for epoch in due if epoch <= reported]
        history = tracker.client.get_metric_history(trial["run"], "score")
        assert sorted(m.step for m in history) == list(range(1, reported + 1))  # each epoch once
        assert result.metrics["cost"] == 1.0
        checkpoint = load_checkpoint(result.checkpoint.path)
        assert checkpoint["epoch"] == reported
        torch.testing.assert_close(checkpoint["weight"], torch.full((3,), float(reported)))
    assert stopped >= 2  # the two weakest trials were stopped at a rung


def _stopping_trial(config: dict[str, Any]) -> None:
    """A Tune trial with a report interval longer than itself, whose driver starts stopping the
    sweep (`stop_requested` names a reason) once it has trained `stop_at` epochs."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run = _trial_run(config, trial_id)
    trained = Path(config["log"]) / "trained.json"
    epochs: list[int] = []

    def stop_requested() -> str | None:
        return "the sweep was cancelled" if len(epochs) >= config["stop_at"] else None

    with EpochReporter(run, {}, frozenset(), PhaseTimes(), 3600.0, 3600.0, stop_requested) as reporter:
        for epoch in range(1, config["epochs"] + 1):
            epochs.append(epoch)
            trained.write_text(json.dumps(epochs))
            reporter(EpochReport(epoch, {"score": float(epoch)}, epoch == config["epochs"],
                                 lambda epoch=epoch: {"epoch": epoch}))
    run.flush()


def test_a_stop_request_reaches_tune_within_an_epoch(tmp_path) -> None:
    """A trial that would report only its last epoch reports at once when its driver is stopping
    the sweep (cancel, SIGTERM), so Tune stops it there: here, a stopper at that epoch."""
    from ray import tune

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracker.start_sweep(tracker.experiment_id("reporting"), "reporting", {})
    config = {"uri": tracker.uri, "parent": parent, "log": str(tmp_path), "epochs": 8, "stop_at": 3}
    results = _tune_fit(_stopping_trial, config, tmp_path, 1, tune.TuneConfig(metric="score", mode="max"),
                        name="stopping", stop={"training_iteration": 3})
    (result,) = results
    assert result.metrics["training_iteration"] == 3
    assert json.loads((tmp_path / "trained.json").read_text()) == [1, 2, 3]  # no epoch past the stop
    assert load_checkpoint(result.checkpoint.path)["epoch"] == 3  # the stop's epoch came with a checkpoint


def _sparse_trial(config: dict[str, Any]) -> None:
    """A Tune trial of `epochs` epochs through an `EpochReporter` that checkpoints after
    `interval` seconds, resuming from Tune's checkpoint; its first attempt fails after `fail_after`."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run = _trial_run(config, trial_id)
    log = Path(config["log"]) / "attempts.json"
    attempts = json.loads(log.read_text()) if log.exists() else []
    checkpoint = tune.get_checkpoint()
    start = load_checkpoint(checkpoint.path)["epoch"] if checkpoint else 0
    attempts.append({"resumed_from": start, "epochs": []})
    try:
        with EpochReporter(run, {}, config["decisions"], PhaseTimes(), config["interval"]) as reporter:  # Tune: every epoch
            for epoch in range(start + 1, config["epochs"] + 1):
                if len(attempts) == 1 and epoch > config["fail_after"]:
                    raise RuntimeError("the first attempt dies here")
                attempts[-1]["epochs"].append(epoch)
                log.write_text(json.dumps(attempts))
                reporter(EpochReport(epoch, {"val_acc": epoch / 10}, epoch == config["epochs"],
                                     lambda epoch=epoch: {"epoch": epoch}))
    finally:
        run.flush()  # as the trainable's child_run does before the run ends, failed or not


def test_checkpoints_follow_the_interval_and_a_retry_retrains_from_the_last(tmp_path) -> None:
    """With an interval longer than the trial, only the decision epochs and the last are
    checkpointed; Tune and MLflow still get every epoch, and a trial that fails after an epoch
    with no checkpoint retrains from the last one, logging each epoch once."""
    from ray import tune

    from sweeps.callbacks import JsonResults

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracker.start_sweep(tracker.experiment_id("reporting"), "reporting", {})
    config = {"uri": tracker.uri, "parent": parent, "log": str(tmp_path), "epochs": 7, "decisions": frozenset({3}),
              "interval": 3600.0, "fail_after": 5}
    results = _tune_fit(_sparse_trial, config, tmp_path, 1, tune.TuneConfig(metric="val_acc", mode="max"),
                        name="sparse", failure_config=tune.FailureConfig(max_failures=1),
                        callbacks=[JsonResults()])  # the sweep's result.json, restart-safe
    (result,) = results
    attempts = json.loads((tmp_path / "attempts.json").read_text())
    assert attempts == [{"resumed_from": 0, "epochs": [1, 2, 3, 4, 5]},
                        {"resumed_from": 3, "epochs": [4, 5, 6, 7]}]  # epochs 4, 5 had no checkpoint
    trial_dir = Path(result.path)
    saved = sorted(load_checkpoint(path)["epoch"] for path in trial_dir.glob("checkpoint_*"))
    assert saved == [3, 7]  # the decision epoch and the last: none for the interval
    reported = [json.loads(line)["training_iteration"] for line in (trial_dir / "result.json").read_text().splitlines()]
    assert reported == [1, 2, 3, 4, 5, 4, 5, 6, 7]  # Tune saw every epoch, the retrained ones again
    (run,) = tracker.children(parent, "trial")
    history = tracker.client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(e, e / 10) for e in range(1, 8)]  # each epoch once


@pytest.mark.parametrize(("field", "default"), [("checkpoint_interval", 60.0), ("report_interval", 5.0)])
@pytest.mark.parametrize(("given", "seconds"), [(None, None), ("0s", 0.0), (0, 0.0), ("2m", 120.0), (7.5, 7.5)])
def test_the_intervals_are_durations(spec_dict, field, default, given, seconds) -> None:
    spec_dict["sweep"] = {} if given is None else {field: given}
    assert getattr(SweepSpec.model_validate(spec_dict).sweep, field) == (default if given is None else seconds)


@pytest.mark.parametrize("given", [-1, "soon", "2y", float("nan"), True, 10**6])
@pytest.mark.parametrize("field", ["checkpoint_interval", "report_interval"])
def test_a_bad_interval_is_refused(spec_dict, field, given) -> None:
    from sweeps.spec import SpecError

    spec_dict["sweep"] = {field: given}
    with pytest.raises((SpecError, ValueError), match=field):
        SweepSpec.model_validate(spec_dict)


def test_driver_parts_count_their_cpu_time() -> None:
    @driver_part("unit_test_part")
    def busy(n: int) -> int:
        return sum(i * i for i in range(n))

    before = dict(DRIVER_CPU.seconds)
    assert busy(200_000) == sum(i * i for i in range(200_000))
    assert DRIVER_CPU.since(before)["unit_test_part"] > 0
    assert busy.__name__ == "busy"


def test_a_process_start_counts_once_per_process() -> None:
    import subprocess
    import sys

    code = ("import time; time.sleep(0.5); from sweeps.timings import process_start_seconds as s; "
            "print(s(), s())")
    first, second = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True, timeout=120).stdout.split())
    assert 0.5 <= first < 120  # the sleep and the imports since the process started
    assert second == 0.0  # a reused actor's later trials: no start of their own
