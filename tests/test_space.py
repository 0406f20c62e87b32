"""Spec -> Optuna define-by-run space: bounds, conditions, and the resolved trial plan."""

from __future__ import annotations

import pickle

import optuna
from ray.tune.search.optuna import OptunaSearch

from sweeps.sources import source_plan, source_stages, teacher_stage
from sweeps.space import SearchSpace, resolve_trial
from sweeps.spec import parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(spec, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = SearchSpace(spec)
    samples = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        samples.append(dict(trial.params))
        study.tell(trial, 0.0)
    return samples


def test_samples_stay_in_bounds(spec_dict) -> None:
    spec_dict["search"]["recipe.batch_size"] = {"type": "int", "low": 16, "high": 128, "step": 16}
    spec = parse_spec(spec_dict)
    for params in sample(spec, 40):
        assert set(params) == {"method.T", "method.kl_reduction", "recipe.lr", "recipe.batch_size"}
        assert 1.0 <= params["method.T"] <= 10.0
        assert params["method.kl_reduction"] in ("batchmean", "mean")
        assert 0.01 <= params["recipe.lr"] <= 0.2
        assert params["recipe.batch_size"] % 16 == 0 and 16 <= params["recipe.batch_size"] <= 128


def test_log_scale_is_recorded_in_the_distribution(spec_dict) -> None:
    study = optuna.create_study()
    trial = study.ask()
    SearchSpace(parse_spec(spec_dict))(trial)
    assert trial.distributions["recipe.lr"].log is True
    assert trial.distributions["method.T"].log is False


def test_conditional_parameters_follow_the_method(spec_dict) -> None:
    spec_dict["search"] = {
        "method.name": {"choices": ["kd", "ce"]},
        "method.T": {"low": 1.0, "high": 10.0, "when": {"method.name": "kd"}},
        "method.w_kd": {"low": 0.0, "high": 1.0, "when": {"method.name": ["kd"]}},
        "method.w_ce": {"low": 0.1, "high": 1.0},
    }
    spec = parse_spec(spec_dict)
    samples = sample(spec, 30)
    methods = {p["method.name"] for p in samples}
    assert methods == {"kd", "ce"}
    for params in samples:
        has_kd_params = {"method.T", "method.w_kd"} <= set(params)
        assert has_kd_params == (params["method.name"] == "kd")
        assert "method.w_ce" in params
        plan = resolve_trial(spec, params)
        assert plan.method == params["method.name"]
        stages = source_stages(plan.method, plan.params, source_plan(spec, 10, (1, 8, 8)))
        assert len(stages) == (1 if plan.method == "kd" else 0)


def test_resolved_plan_merges_spec_and_sampled_values(spec_dict) -> None:
    spec_dict["method"]["params"] = {"T": 4.0, "w_ce": 0.2}
    spec = parse_spec(spec_dict)
    plan = resolve_trial(spec, {"method.T": 7.0, "recipe.lr": 0.03})
    assert (plan.params.T, plan.params.w_ce, plan.params.w_kd) == (7.0, 0.2, 0.9)
    assert plan.recipe.lr == 0.03 and plan.recipe.epochs == 3
    assert plan.param_dict()["kl_reduction"] == "batchmean"


def test_teacher_stage_is_the_same_for_every_trial(spec_dict) -> None:
    spec = parse_spec(spec_dict)
    sources = source_plan(spec, 10, (1, 8, 8))
    keys = set()
    for params in sample(spec, 5):
        plan = resolve_trial(spec, params)
        keys |= {stage.key for stage in source_stages(plan.method, plan.params, sources)}
    assert keys == {teacher_stage(spec).key}


def test_ray_optuna_search_suggests_from_the_space_and_pickles(spec_dict, tmp_path) -> None:
    spec = parse_spec(spec_dict)
    searcher = OptunaSearch(
        space=SearchSpace(spec), metric="val_acc_best", mode="max",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
    )
    config = searcher.suggest("trial_1")
    assert set(config) == set(spec.search)
    searcher.on_trial_complete("trial_1", {"val_acc_best": 0.9, "training_iteration": 3})
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune snapshots the searcher like this
    restored = pickle.loads((tmp_path / "searcher.pkl").read_bytes())
    assert callable(restored["_space"])


def test_seeded_tpe_is_reproducible(spec_dict) -> None:
    spec = parse_spec(spec_dict)

    def run() -> list[dict]:
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=7, n_startup_trials=3))
        study.optimize(lambda t: (SearchSpace(spec)(t), t.params["method.T"])[1], n_trials=8)
        return [t.params for t in study.trials]

    assert run() == run()


def test_fixed_method_needs_no_method_name_param(spec_dict) -> None:
    spec = parse_spec(spec_dict)
    for params in sample(spec, 3):
        assert "method.name" not in params
        assert resolve_trial(spec, params).method == "kd"
