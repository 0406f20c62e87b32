"""Every MLflow tag kdsweep writes, by name. Other modules import these; no tag literal lives elsewhere.

Runs: one parent run per sweep (role `sweep`), one child per trial (`trial`), per stage
(`teacher`, `assistant`, `baseline`, `sftn_teacher`, `lw_teacher`) and per confirmation
re-training (`confirm`).
"""

from __future__ import annotations

PREFIX = "kdsweep."

# Every run of a sweep.
SWEEP = PREFIX + "sweep"  # the sweep name
ROLE = PREFIX + "role"  # sweep | trial | confirm | a stage role
END_REASON = PREFIX + "end_reason"  # why a run ended FAILED or KILLED

# The parent run.
SPEC = PREFIX + "spec"  # the spec name
STORAGE = PREFIX + "storage"  # the storage root of the sweep's Tune experiment, stages and exports
BEST_TRIAL_ID = PREFIX + "best_trial_id"
BEST_RUN_ID = PREFIX + "best_run_id"
MODEL_URI = PREFIX + "model_uri"  # pinned: models:/NAME/VERSION, never an alias
MODEL_VERSION = PREFIX + "model_version"
CHAMPION = PREFIX + "champion"  # whether the sweep's version took the `champion` alias, and why
BASELINE_RUN_ID = PREFIX + "baseline_run_id"
TEACHER_RUN_ID = PREFIX + "teacher_run_id"
PARETO_TRIAL_IDS = PREFIX + "pareto_trial_ids"  # comma-separated, multi-objective sweeps only
CONFIRMED_BEST_TRIAL_ID = PREFIX + "confirmed_best_trial_id"
TIME_BUDGET = PREFIX + "time_budget"  # set when sweep.time_budget ended the sweep: how many trials ran
WARM_START_FROM = PREFIX + "warm_start_from"  # the earlier sweep this one started from (sweep.warm_start)
WARM_START_RUN_ID = PREFIX + "warm_start_run_id"  # that sweep's parent run
WARM_START = PREFIX + "warm_start"  # what was taken from it: trials added to the study, or points enqueued

# Child runs.
TRIAL_ID = PREFIX + "trial_id"  # trial and confirmation runs: the Tune trial id
RERUN_OF = PREFIX + "rerun_of"  # a trial run taken over from a Tune trial lost in a driver crash: its id
STAGE_KEY = PREFIX + "stage_key"  # stage runs: the stage's hash key
CONFIRM_KEY = PREFIX + "confirm_key"  # confirmation runs: "<trial id>/seed<seed>"
NODE_IP = PREFIX + "node_ip"  # the Ray node a trial ran on (updated when a retry moves it)
WORKER_IPS = PREFIX + "worker_ips"  # every data-parallel rank's node, rank 0 first (workers_per_trial > 1)
TEACHER_CACHE = PREFIX + "teacher_cache"  # on | off

# Registered model versions (besides SWEEP): what the champion rule compares, what pinning checks.
VAL_ACC = PREFIX + "val_acc"  # the exported trial's best-epoch val accuracy
DATA_KEY = PREFIX + "data_key"  # hash of the dataset spec the val accuracy was measured on
WEIGHTS_SHA256 = PREFIX + "weights_sha256"  # of the version's state-dict file in its run's export/


def lineage(label: str) -> tuple[str, str]:
    """(run id tag, stage key tag) naming the source `label` (teacher, assistant_1, ...) of a run."""
    return f"{PREFIX}{label}_run_id", f"{PREFIX}{label}_stage_key"
