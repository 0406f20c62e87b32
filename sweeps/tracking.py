"""MLflow tracking: one parent run per sweep, one child run per trial or stage.

Runs are addressed by explicit ids through `MlflowClient` (no global active run), so the
same code works in trial processes and the driver. Every run ends with a terminal status;
the driver reconciles any child a crash or an early stop left RUNNING.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

TAG_SWEEP = "kdsweep.sweep"  # the sweep name, on every run of a sweep
TAG_SPEC = "kdsweep.spec"  # the spec name, on the parent run
TAG_ROLE = "kdsweep.role"  # sweep | trial | teacher | baseline
TAG_TRIAL = "kdsweep.trial_id"
TAG_STAGE = "kdsweep.stage_key"
TAG_STORAGE = "kdsweep.storage"
TAG_REASON = "kdsweep.end_reason"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
BATCH = 100  # MLflow's limit of params per log_batch call
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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


class Tracker:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=local_artifact_root(self.uri))

    def _all_experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def find_sweeps(self, name: str | None = None) -> list[Run]:
        """Parent runs of sweeps, newest first; `name` matches a sweep or spec name."""
        ids = self._all_experiment_ids()
        if not ids:
            return []
        runs = self.client.search_runs(
            ids, f"tags.`{TAG_ROLE}` = 'sweep'", order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        if name is None:
            return list(runs)
        exact = [r for r in runs if r.data.tags.get(TAG_SWEEP) == name]
        return exact or [r for r in runs if r.data.tags.get(TAG_SPEC) == name]

    def start_sweep(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            experiment_id, run_name=name,
            tags={TAG_ROLE: "sweep", TAG_SWEEP: name, **tags},
        )
        return run.info.run_id

    def children(self, parent_run_id: str, role: str | None = None) -> list[Run]:
        parent = self.client.get_run(parent_run_id)
        query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
        if role:
            query += f" and tags.`{TAG_ROLE}` = '{role}'"
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

    def open_child(
        self, parent_run_id: str, role: str, key_tag: str, key: str, name: str,
        params: dict[str, Any], tags: dict[str, str],
    ) -> str:
        """Create the child run identified by (`key_tag`, `key`), or reopen it after a restart
        (its `tags` then updated: a retried trial may run on another node)."""
        parent = self.client.get_run(parent_run_id)
        existing = [r for r in self.children(parent_run_id, role) if r.data.tags.get(key_tag) == key]
        if existing:  # a retried or resumed trial, or a stage retrained after a crash
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            if TAG_REASON in existing[0].data.tags:
                self.client.delete_tag(run_id, TAG_REASON)
            if tags:
                self.set_tags(run_id, tags)
            return run_id
        run = self.client.create_run(
            parent.info.experiment_id, run_name=name,
            tags={MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_ROLE: role, key_tag: key,
                  TAG_SWEEP: parent.data.tags.get(TAG_SWEEP, ""), **tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[start:start + BATCH])

    def last_step(self, run_id: str, key: str = "val_acc") -> int:
        """The last step logged for `key` (0 if none): a resumed run skips what it logged."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str, reason: str | None = None) -> None:
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        if reason:
            self.set_tags(run_id, {TAG_REASON: reason[:5000]})
        self.client.set_terminated(run_id, status=status)

    def finish_if_running(self, run_id: str, status: str, reason: str | None = None) -> bool:
        if self.client.get_run(run_id).info.status != "RUNNING":
            return False
        self.finish(run_id, status, reason)
        return True

    def running_children(self, parent_run_id: str) -> Iterable[Run]:
        return [r for r in self.children(parent_run_id) if r.info.status == "RUNNING"]
