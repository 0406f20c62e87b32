"""`sweep.warm_start: {from: NAME, top_k: K}`: a new sweep starts from what an earlier sweep in the
same tracking store learned, through its Optuna study (in the earlier sweep's storage folder).

- Same search space (every parameter of every finished earlier trial has the very distribution
  the new spec gives it, and the objectives are the same): the earlier finished trials (COMPLETE
  and PRUNED, with their values and per-epoch values) are added to the new study, so TPE samples
  from an informed model at once; they count as history, not as trials of the new sweep.
- Otherwise: the earlier top K configurations (best first by val accuracy), restricted to the
  parameters the new space has and to values inside it, are enqueued and run first, like
  `initial_points`.

The parent run records the lineage (`tags.WARM_START_FROM`, `tags.WARM_START_RUN_ID`) and what was
taken (`tags.WARM_START`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeps import tags
from sweeps.search import STUDY_FILE
from sweeps.spec import ParamSpec, SpecError, SweepSpec
from sweeps.study_search import TUNE_TRIAL_ATTR
from sweeps.tracking import Tracker

ORIGIN_ATTR = tags.WARM_START_FROM  # also the user attribute of a trial added from an earlier study


@dataclass(frozen=True)
class WarmStart:
    """An earlier sweep resolved for `sweep.warm_start`."""

    sweep: str  # its name
    run_id: str  # its parent run
    trials: list[FrozenTrial]  # its finished trials (COMPLETE, PRUNED), best COMPLETE ones first
    same_space: bool  # its trials can join the new study as they are
    top_k: int

    def lineage_tags(self) -> dict[str, str]:
        """The parent run's lineage tags (what was taken is added by `start_from`)."""
        return {tags.WARM_START_FROM: self.sweep, tags.WARM_START_RUN_ID: self.run_id}


def objectives(spec: SweepSpec) -> str:
    """The objectives as the parent run's `objectives` param records them (`accuracy,params`)."""
    return ",".join(spec.sweep.objectives)


def distribution(param: ParamSpec) -> BaseDistribution:
    """The Optuna distribution `sweeps.space.suggest` samples `param` from."""
    if param.type == "categorical":
        return CategoricalDistribution(param.choices)
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def _inside(param: ParamSpec, value: Any) -> bool:
    """`value` is one the new space can take for `param` (as `check_initial_points` judges)."""
    if param.type == "categorical":
        return value in (param.choices or [])
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return param.low <= value <= param.high and (param.type != "int" or float(value).is_integer())


def resolve_warm_start(tracker: Tracker, spec: SweepSpec) -> WarmStart | None:
    """The earlier sweep `spec.sweep.warm_start` names, with its finished trials; None without
    warm start. Raises SpecError (a one-line user error) when the sweep is not in the tracking
    store, its study is gone, or it has no finished trial. Reads only."""
    warm = spec.sweep.warm_start
    if warm is None:
        return None
    name, where = warm.from_, "sweep.warm_start.from"
    runs = [r for r in tracker.find_sweeps(name) if r.data.tags.get(tags.SWEEP) == name]
    if not runs:
        raise SpecError(f"{where}: no sweep named {name!r} at {tracker.uri}")
    parent = runs[0]
    study_file = Path(parent.data.tags.get(tags.STORAGE, "")) / name / STUDY_FILE
    if not study_file.is_file():
        raise SpecError(f"{where}: sweep {name!r} has no Optuna study at {study_file} (its storage folder "
                        "was moved or deleted)")
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_file}", skip_table_creation=True)
    study = optuna.load_study(study_name=name, storage=storage)
    finished = study.get_trials(deepcopy=True, states=(TrialState.COMPLETE, TrialState.PRUNED))
    best = sorted((t for t in finished if t.state == TrialState.COMPLETE and t.values),
                  key=lambda t: t.values[0], reverse=True)  # val accuracy, maximised
    if not best:
        raise SpecError(f"{where}: sweep {name!r} has no finished trial to start from")
    space = {path: distribution(param) for path, param in spec.search.items()}
    same = parent.data.params.get("objectives", "accuracy") == objectives(spec) and all(
        space.get(key) == dist for trial in finished for key, dist in trial.distributions.items())
    rest = [t for t in finished if t.state != TrialState.COMPLETE or not t.values]
    return WarmStart(name, parent.info.run_id, [*best, *rest], same, warm.top_k)


def start_from(warm: WarmStart, spec: SweepSpec, study_url: str, study_name: str) -> str:
    """Put what `warm` offers into the new sweep's study (created here, before the searcher
    loads it); returns what was done, for the parent run's `tags.WARM_START`."""
    directions = ["maximize", *(["minimize"] if spec.sweep.cost else [])]
    study = optuna.create_study(storage=study_url, study_name=study_name, directions=directions, load_if_exists=True)
    if warm.same_space:
        for trial in warm.trials:  # not this sweep's Tune trials: a resume must not take them for lost ones
            trial.user_attrs = {**{k: v for k, v in trial.user_attrs.items() if k != TUNE_TRIAL_ATTR},
                                ORIGIN_ATTR: warm.sweep}
        study.add_trials(warm.trials)
        return f"added {len(warm.trials)} finished trials of {warm.sweep} to the study (same search space)"
    points: list[dict[str, Any]] = []
    for trial in [t for t in warm.trials if t.state == TrialState.COMPLETE][:warm.top_k]:  # best first
        point = {k: v for k, v in trial.params.items() if k in spec.search and _inside(spec.search[k], v)}
        if point and point not in points:
            points.append(point)
    for point in points:
        study.enqueue_trial(point, user_attrs={ORIGIN_ATTR: warm.sweep})
    return (f"enqueued the top {len(points)} configurations of {warm.sweep} (another search space: "
            "only the parameters it shares with this one)")
