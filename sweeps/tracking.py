"""MLflow tracking: one parent run per sweep, one child run per trial, stage or re-training.

Runs are addressed by explicit ids through `MlflowClient` (no global active run), so the
same code works in trial processes and the driver. `end_status` is the one rule for a child
run's terminal status, used by the training process (`sweeps.child_runs.child_run`) and by the
driver when it closes runs a stopped or dead process left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeps import tags

if TYPE_CHECKING:
    from mlflow.entities import Run

# MLflow (and kd_core, hence torch) are imported where they are used: every command imports this
# module, and `kdsweep --help` must not wait seconds for them.

TERMINAL = ("FINISHED", "FAILED", "KILLED")
BATCH = 100  # MLflow's limit of params per log_batch call
METRIC_BATCH = 1000  # and of metrics
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow 3's UI opens an experiment by its kind: model development opens on its runs (GenAI would
# open on traces). The tag and value are the UI's (mlflow/server/js: ExperimentKind).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def resolve_tracking_uri(uri: str | None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else MLflow's default, made absolute.

    A relative SQLite path is resolved against the current directory here, because trial
    processes run elsewhere.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def local_artifact_root(uri: str) -> str | None:
    """Artifact root beside a local SQLite store (the layout `mlflow server` uses)."""
    prefix = "sqlite:////"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix) - 1:]).parent / "mlartifacts").resolve().as_uri()
    return None


def _quoted(value: str) -> str:
    """`value` for a single-quoted literal of an MLflow search filter (ids and keys: no quotes)."""
    if "'" in value or "\\" in value:
        raise ValueError(f"cannot search MLflow runs by a tag value with a quote or backslash: {value!r}")
    return value


class Tracker:
    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def experiment_id(self, name: str) -> str:
        """The experiment `name`, created as a model-development experiment if it is new; one
        without a kind (made elsewhere, or by an earlier kdsweep) is given it."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=local_artifact_root(self.uri),
                                                 tags=EXPERIMENT_KIND)
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def _all_experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def find_sweeps(self, name: str | None = None) -> list[Run]:
        """Parent runs of sweeps, newest first; `name` matches a sweep or spec name."""
        ids = self._all_experiment_ids()
        if not ids:
            return []
        runs = self.client.search_runs(
            ids, f"tags.`{tags.ROLE}` = 'sweep'", order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        if name is None:
            return list(runs)
        exact = [r for r in runs if r.data.tags.get(tags.SWEEP) == name]
        return exact or [r for r in runs if r.data.tags.get(tags.SPEC) == name]

    def start_sweep(self, experiment_id: str, name: str, run_tags: dict[str, str]) -> str:
        run = self.client.create_run(
            experiment_id, run_name=name,
            tags={tags.ROLE: "sweep", tags.SWEEP: name, **run_tags},
        )
        return run.info.run_id

    def children(self, parent_run_id: str, role: str | None = None, where: dict[str, str] | None = None) -> list[Run]:
        """The child runs of a parent, of `role` if given, whose tags equal `where` (in the store's query)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        parent = self.client.get_run(parent_run_id)
        wanted = {MLFLOW_PARENT_RUN_ID: parent_run_id, **({tags.ROLE: role} if role else {}), **(where or {})}
        query = " and ".join(f"tags.`{key}` = '{_quoted(value)}'" for key, value in wanted.items())
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [parent.info.experiment_id], query, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def child_by_key(self, parent_run_id: str, role: str, key_tag: str, key: str) -> Run | None:
        """The child run of `role` whose tag `key_tag` is `key`, if any."""
        found = self.children(parent_run_id, role, {key_tag: key})  # one run, however many trials the sweep has
        return found[0] if found else None

    def open_child(
        self, parent_run_id: str, role: str, key_tag: str, key: str, name: str,
        params: dict[str, Any], run_tags: dict[str, str],
    ) -> str:
        """Create the child run identified by (`key_tag`, `key`), or reopen it after a restart
        (its `run_tags` then updated: a retried trial may run on another node)."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        existing = self.child_by_key(parent_run_id, role, key_tag, key)
        if existing is not None:  # a retried or resumed trial, or a stage retrained after a crash
            run_id = existing.info.run_id
            self.reopen(run_id)
            if run_tags:
                self.set_tags(run_id, run_tags)
            # A process killed between creating the run and logging its params left it without them.
            self.log_params(run_id, {k: v for k, v in params.items() if k not in existing.data.params})
            return run_id
        parent = self.client.get_run(parent_run_id)
        run = self.client.create_run(
            parent.info.experiment_id, run_name=name,
            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, tags.ROLE: role, key_tag: key,
                  tags.SWEEP: parent.data.tags.get(tags.SWEEP, ""), **run_tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def rekey_child(self, parent_run_id: str, role: str, key_tag: str, old: str, new: str) -> None:
        """The child run keyed `old`, if any, is keyed (and named) `new` from now on: a trial lost
        in a driver crash runs again as a new Tune trial, and goes on in the same run."""
        run = self.child_by_key(parent_run_id, role, key_tag, old)
        if run is not None:
            self.set_tags(run.info.run_id, {key_tag: new, tags.RERUN_OF: old, "mlflow.runName": f"{role}-{new}"})

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[start:start + BATCH])

    def last_step(self, run_id: str, key: str = "val_acc") -> int:
        """The last step logged for `key` (0 if none): a resumed run skips what it logged."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics at `step`, stamped now."""
        self.log_steps(run_id, [(step, int(time.time() * 1000), metrics)])

    def log_steps(self, run_id: str, steps: list[tuple[int, int, dict[str, float]]]) -> None:
        """Metrics of several steps, each `(step, timestamp in ms, {key: value})`, in as few
        writes as MLflow's batch limit allows."""
        from mlflow.entities import Metric

        items = [Metric(k, float(v), stamp, step) for step, stamp, metrics in steps for k, v in metrics.items()]
        for start in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[start:start + METRIC_BATCH])

    def set_tags(self, run_id: str, run_tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in run_tags.items()])

    def finish(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run with `status`; its reason tag says `reason`, or goes (a reopened run may
        carry an earlier ending's reason)."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        if reason:
            self.set_tags(run_id, {tags.END_REASON: reason[:5000]})
        elif tags.END_REASON in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, tags.END_REASON)
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """A run running again (a resumed sweep, a retried trial): RUNNING, without its last reason."""
        self.client.update_run(run_id, status="RUNNING")
        if tags.END_REASON in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, tags.END_REASON)

    def finish_if_running(self, run_id: str, status: str, reason: str | None = None) -> bool:
        if self.client.get_run(run_id).info.status != "RUNNING":
            return False
        self.finish(run_id, status, reason)
        return True

    def running_children(self, parent_run_id: str) -> Iterable[Run]:
        return [r for r in self.children(parent_run_id) if r.info.status == "RUNNING"]


def end_status(epochs_done: int, epochs: int, error: BaseException | str | None = None) -> tuple[str, str | None]:
    """(MLflow status, reason) of a run that ended after `epochs_done` of `epochs` epochs.

    `error` is what ended it: an exception in the run's own process, a description from
    the driver (Tune reported the trial errored), or None when it simply ended. SystemExit is
    how Tune stops a trial (ASHA, and every trial at max_t): FINISHED if every epoch ran. The
    scheduler's reason is the driver's to give (`CloseTrialRuns`): only it knows the stop was ASHA's.
    """
    from kd_core.train import NonFiniteLossError

    if isinstance(error, KeyboardInterrupt):
        return "KILLED", "interrupted"
    if isinstance(error, NonFiniteLossError):
        return "FAILED", f"non-finite loss: {error}"
    if isinstance(error, str):
        return "FAILED", error
    if isinstance(error, BaseException) and not isinstance(error, SystemExit):
        return "FAILED", f"{type(error).__name__}: {error}"
    if epochs_done >= epochs:
        return "FINISHED", None
    return "KILLED", f"stopped early by the scheduler after {epochs_done} of {epochs} epochs"
