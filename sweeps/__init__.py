"""Ray Tune + Optuna + MLflow around kd_core."""

import os

# Nothing leaves the machine: no usage reports from Ray or MLflow.
for _variable, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}.items():
    os.environ.setdefault(_variable, _value)
