"""Everything a sweep can check before Ray starts and before anything is written (issue 13,
faults 1, 2 and 5): the spec alone (`sweeps.spec`), the world (`sweeps.preflight`), and the
resources every trial and task asks Ray for."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType
from torch import nn
from typer.testing import CliRunner

from kd_core.models import MODELS
from sweeps import preflight
from sweeps.cli import app
from sweeps.spec import SpecError, SweepSpec, load_spec, parse_spec
from sweeps.spec.settings import SweepSettings
from sweeps.tracking import Tracker
from tests.cifar_files import CIFAR10_FOLDER, _batch, _dump, write_cifar
from tests.conftest import BASE_SPEC

SHIPPED = Path(__file__).parent.parent / "sweeps" / "specs" / "digits_kd.yaml"
NO_CUDA = not torch.cuda.is_available()


def spec_with(**blocks: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE_SPEC)
    data.update(blocks)
    return data


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as error:
        parse_spec(data)
    return " ".join(str(error.value).split())


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- the spec alone: refused when it is loaded ---------------------------------------------


def test_grace_period_beyond_the_epochs_names_both_fields(tmp_path) -> None:
    text = SHIPPED.read_text().replace("recipe: {name: digits, epochs: 20}", "recipe: {name: digits, epochs: 3}")
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, text))
    message = " ".join(str(error.value).split())
    assert "sweep.scheduler.grace_period (4) is more than recipe.epochs (3)" in message
    assert "set sweep.scheduler.grace_period to at most 3" in message


def test_the_default_grace_period_fits_short_recipes() -> None:
    spec = parse_spec(spec_with(recipe={"name": "digits", "epochs": 1}))
    assert spec.sweep.scheduler.grace_period == 1
    given = spec_with(recipe={"name": "digits", "epochs": 1}, sweep={"scheduler": {"grace_period": 3}})
    assert "sweep.scheduler.grace_period (3) is more than recipe.epochs (1)" in refused(given)


@pytest.mark.parametrize(("step", "message"), [(0, "step must be > 0, got 0.0"), (-1, "step must be > 0, got -1.0"),
                                               (20, "step (20.0) is larger than the range")])
def test_search_step_must_be_positive(step, message) -> None:
    search = {"method.T": {"low": 1.0, "high": 10.0, "step": step}}
    assert f"search.method.T: {message}" in refused(spec_with(search=search))


def test_int_step_must_be_whole() -> None:
    search = {"student.args.width": {"type": "int", "low": 2, "high": 8, "step": 1.5}}
    assert "search.student.args.width: an int parameter needs a whole-number 'step'" in refused(spec_with(search=search))


def test_nesterov_without_momentum_is_refused() -> None:
    message = refused(spec_with(recipe={"name": "digits", "momentum": 0}))
    assert "recipe: nesterov needs momentum > 0" in message


def test_every_combination_of_searched_recipe_fields_builds() -> None:
    search = {"recipe.momentum": {"low": 0.0, "high": 0.9}, "recipe.nesterov": {"choices": [False, True]}}
    message = refused(spec_with(recipe={"name": "digits", "nesterov": False}, search=search))
    assert "search: the recipe with recipe.momentum=0.0, recipe.nesterov=True is invalid: nesterov needs" in message


def test_all_zero_fixed_weights_are_refused() -> None:
    message = refused(spec_with(method={"name": "kd", "params": {"w_ce": 0, "w_kd": 0}}))
    assert "method kd: method.params: every loss weight (w_ce, w_kd) is 0" in message


def test_search_allowing_only_zero_weights_is_refused() -> None:
    search = {**BASE_SPEC["search"], "method.w_kd": {"choices": [0.0]}}
    message = refused(spec_with(method={"name": "kd", "params": {"w_ce": 0}}, search=search))
    assert "method kd: search.method.w_kd and method.params: every loss weight (w_ce, w_kd) is 0" in message
    search["method.w_kd"] = {"low": 0.0, "high": 1.0}  # a positive weight is possible: fine
    parse_spec(spec_with(method={"name": "kd", "params": {"w_ce": 0}}, search=search))


@pytest.mark.parametrize(("text", "message"), [
    ("recipe: {name: digits, batch_size: 1e12}", "recipe: batch_size: 1000000000000.0 is a float where a whole "
                                                  "number is meant; batch_size must be <= 65536"),
    ("recipe: {name: digits, batch_size: 100000000}", "batch_size must be <= 65536 (a sane upper bound)"),
    ("recipe: {name: digits, epochs: 2.0}", "recipe: epochs: 2.0 is a float where a whole number is meant"),
    ("sweep: {num_trials: 1e20}", "sweep.num_trials: 1e+20 is not a whole number (a count from 1 to 100000)"),
    ("sweep: {num_trials: 100000000}", "sweep.num_trials: Input should be less than or equal to 100000"),
    ("sweep: {num_trials: 2.5}", "sweep.num_trials: 2.5 is not a whole number"),
    ("sweep: {max_concurrent: 1000000}", "sweep.max_concurrent: Input should be less than or equal to 1024"),
    ("sweep: {cpus_per_trial: 1.5}", "sweep.cpus_per_trial: more than 1 must be a whole number"),
    ("sweep: {gpus_per_trial: 1000}", "sweep.gpus_per_trial: Input should be less than or equal to 64"),
    ("sweep: {confirm: {top_k: 3.0}}", "sweep.confirm.top_k: 3.0 is not a whole number"),
])
def test_nonsense_sizes_and_floats_for_counts_are_refused(tmp_path, text, message) -> None:
    base = yaml.safe_dump({k: v for k, v in BASE_SPEC.items() if k not in ("recipe", "sweep")})
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, base + text + "\n"))
    assert message in " ".join(str(error.value).split())


def test_a_float_searched_for_an_int_field_is_refused() -> None:
    search = {"recipe.batch_size": {"low": 16, "high": 128}}  # type float by default
    assert "search.recipe.batch_size: value 16.0 is invalid: batch_size: 16.0 is a float" in refused(
        spec_with(search=search))


# --- the spec file ---------------------------------------------------------------------------


def test_duplicate_keys_are_refused_with_their_lines(tmp_path) -> None:
    text = SHIPPED.read_text() + "\nsweep:\n  num_trials: 3\n"
    with pytest.raises(SpecError, match=r"duplicate key 'sweep' at line \d+ \(first given at line \d+\)"):
        load_spec(write(tmp_path, text))
    with pytest.raises(SpecError, match="duplicate key 'low' at line 1"):
        load_spec(write(tmp_path, "search: {method.T: {low: 1, low: 2, high: 3}}\n"))


def test_merge_keys_may_be_overridden(tmp_path) -> None:
    text = yaml.safe_dump({k: v for k, v in BASE_SPEC.items() if k not in ("teacher", "recipe")})
    text += ("teacher:\n  arch: {name: convnet, args: {width: 8}}\n  recipe: &teacher {name: digits, epochs: 3}\n"
             "recipe: {<<: *teacher, epochs: 4}\n")
    spec = load_spec(write(tmp_path, text))
    assert (spec.teacher_recipe.build().epochs, spec.recipe.build().epochs) == (3, 4)


def test_nested_aliases_are_refused_fast_with_a_short_message(tmp_path) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join([f'*{previous}'] * 10)}]")
    started = time.monotonic()
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, "\n".join(lines) + "\nname: laughs\n"))
    assert time.monotonic() - started < 2
    assert "YAML aliases expand to more than 100,000 values" in str(error.value)
    assert len(str(error.value)) < 300 and "\n" not in str(error.value)


def test_recursive_alias_is_refused(tmp_path) -> None:
    with pytest.raises(SpecError, match="refers to a value that contains it"):
        load_spec(write(tmp_path, "a: &a [1, *a]\n"))


def test_spec_that_is_not_utf8(tmp_path) -> None:
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte 0xe9 at line 2\); save the spec as UTF-8"):
        load_spec(write(tmp_path, "name: unit\ndescription: caf\xe9\n".encode("latin-1")))


def test_values_quoted_in_errors_are_bounded() -> None:
    message = refused(spec_with(student={"arch": {"name": "x" * 100_000}}))
    assert "student.arch.name" in message and len(message) < 1500


# --- the world: data, models, resources, the tracking store ---------------------------------


def build(**blocks: Any) -> SweepSpec:
    return parse_spec(spec_with(**blocks))


def failure(spec: SweepSpec, address: str | None = None) -> str:
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check_before_start(spec, address, warn=pytest.fail)
    assert isinstance(error.value, ValueError)  # the command line's user errors
    return str(error.value)


def test_a_valid_spec_passes_without_warnings() -> None:
    preflight.check_before_start(build(), None, warn=pytest.fail)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_gpus_without_cuda_locally() -> None:
    message = failure(build(sweep={"gpus_per_trial": 1}))
    assert message.startswith("sweep.gpus_per_trial: 1 GPU per trial, but this machine has no CUDA GPU")


def test_more_cpus_per_trial_than_this_machine_has() -> None:
    cpus = int(preflight.local_cpu_count())
    message = failure(build(sweep={"cpus_per_trial": cpus + 1}))
    assert message.startswith(f"sweep.cpus_per_trial: {cpus + 1} CPUs per trial, but this machine has {cpus}")


def test_a_cluster_sweep_leaves_resources_to_the_cluster_check() -> None:
    cpus = int(preflight.local_cpu_count())
    preflight.check_before_start(build(sweep={"cpus_per_trial": cpus + 1}), "127.0.0.2:6379", warn=pytest.fail)


def test_cifar_root_without_files(tmp_path) -> None:
    message = failure(build(data={"name": "cifar10", "root": str(tmp_path)}))
    assert message.startswith("data (cifar10): cannot be loaded: cifar10 files not found in")
    assert str(tmp_path) in message


def test_cifar_batch_of_the_wrong_shape(tmp_path) -> None:
    write_cifar(tmp_path, 10, n_train=50, n_test=10)
    broken = _batch(np.random.default_rng(0), 10, 10, ["labels"], "training batch 1 of 5")
    broken["data"] = broken["data"][:, :1000]  # 1000 values per image instead of 3x32x32
    _dump(tmp_path / CIFAR10_FOLDER / "data_batch_1", broken)
    message = failure(build(data={"name": "cifar10", "root": str(tmp_path)}))
    assert message.startswith("data (cifar10") and "cannot be loaded:" in message
    assert str(tmp_path / CIFAR10_FOLDER / "data_batch_1") in message  # the file is named


def test_image_folder_missing(tmp_path) -> None:
    data = {"name": "image_folder", "train_dir": str(tmp_path / "absent"), "val_dir": str(tmp_path)}
    message = failure(build(data=data))
    assert message.startswith("data (image_folder") and "cannot be loaded: image_folder: " in message
    assert f"train_dir '{tmp_path / 'absent'}' is not a directory" in message


def test_image_folder_without_images(tmp_path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "notes.txt").write_text("no image here")
    data = {"name": "image_folder", "train_dir": str(tmp_path / "train"), "val_dir": str(tmp_path / "val")}
    message = failure(build(data=data))
    assert message.startswith(f"data (image_folder, val_dir {tmp_path / 'val'}): cannot be loaded: "
                              f"image_folder: train_dir '{tmp_path / 'train'}'")
    assert "needs one sub-folder of images per class" in message


class _Needs32(nn.Module):
    """A model that runs only on 3x32x32 images (a fixed-size classifier)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def test_a_model_that_cannot_run_on_the_data() -> None:
    if "preflight_needs32" not in MODELS:
        MODELS.register("preflight_needs32")(_Needs32)
    message = failure(build(student={"arch": {"name": "preflight_needs32"}}))
    assert message.startswith("student.arch: preflight_needs32() cannot run on digits images of shape (1, 8, 8):")


def test_warnings_are_one_line_each() -> None:
    warnings: list[str] = []
    preflight.check_before_start(build(data={"name": "digits", "val_fraction": 0.9, "test_fraction": 0.9},
                                       student={"arch": {"name": "convnet", "args": {"width": 32, "depth": 2}}}),
                                 None, warn=warnings.append)
    assert [w.split(":")[0] for w in warnings] == ["data", "student.arch"]
    assert "training images" in warnings[0] and "more than the teacher" in warnings[1]
    assert all("\n" not in w for w in warnings)


def test_resources_are_compared_with_the_ray_cluster_once_connected() -> None:
    from cluster.session import ray_session

    with ray_session(None, num_cpus=1):  # a real local Ray: one node, one CPU, no GPU
        preflight.check_cluster_resources(SweepSettings(cpus_per_trial=1))
        with pytest.raises(preflight.PreflightError, match=r"^sweep.cpus_per_trial: 2 CPUs per trial, but the "
                                                           r"largest node of the Ray cluster has 1 \(the cluster: 1 "):
            preflight.check_cluster_resources(SweepSettings(cpus_per_trial=2))
        with pytest.raises(preflight.PreflightError, match="^sweep.gpus_per_trial: 1 GPUs per trial, but no node"):
            preflight.check_cluster_resources(SweepSettings(gpus_per_trial=1))
    assert not ray.is_initialized()


def deleted_experiment(db: Path, name: str = "kdsweep") -> str:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment_id = client.create_experiment(name)
    client.delete_experiment(experiment_id)
    return experiment_id


def test_a_deleted_experiment_says_how_to_restore_or_purge_it(tmp_path) -> None:
    number = deleted_experiment(tmp_path / "m.db")
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check_experiment(Tracker(f"sqlite:///{tmp_path / 'm.db'}"), "kdsweep")
    message = str(error.value)
    assert message.startswith("tracking.experiment 'kdsweep' is deleted (in MLflow's trash)")
    assert f"mlflow experiments restore --experiment-id {number}" in message and "mlflow gc" in message
    preflight.check_experiment(Tracker(f"sqlite:///{tmp_path / 'm.db'}"), "another")  # absent: fine


# --- fault 2: what trials and tasks ask Ray for (no GPU needed) -----------------------------


def test_trials_and_tasks_request_the_cpus_and_gpus_the_spec_names() -> None:
    from sweeps.pipeline import SweepContext, task_options
    from sweeps.runner import sweep_trainable

    spec = build(sweep={"cpus_per_trial": 2, "gpus_per_trial": 0.5})
    trainable = sweep_trainable(SweepContext("s", spec, "/nowhere", "sqlite:///x.db", "run"))
    assert trainable._resources.bundles == [{"CPU": 2.0, "GPU": 0.5}]  # Tune's placement request of each trial
    # what `data_parallel.submit` gives the finish's tasks (confirmations, the baseline stage)
    assert task_options(spec.sweep) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert not ray.is_initialized()


def test_cpu_sweeps_request_no_gpu() -> None:
    from sweeps.pipeline import trial_resources

    assert trial_resources(SweepSettings(cpus_per_trial=1)).bundles == [{"CPU": 1.0}]


# --- the command line: exit 2, one line, no traceback, nothing written, Ray never started ------

runner = CliRunner()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def cli_refuses(work: Path, spec_text: str, message: str) -> str:
    spec = work / "spec.yaml"
    spec.write_text(spec_text)
    before = sorted(p.name for p in (work / "work").iterdir())
    result = runner.invoke(app, ["run", str(spec)])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert len(output.splitlines()) == 1, output
    assert message in output and "Traceback" not in output
    assert sorted(p.name for p in (work / "work").iterdir()) == before  # nothing written
    assert not ray.is_initialized()
    return output


def base_yaml(**blocks: Any) -> str:
    return yaml.safe_dump(spec_with(**blocks), sort_keys=False)


def test_cli_shipped_spec_with_three_epochs(work) -> None:
    text = SHIPPED.read_text().replace("recipe: {name: digits, epochs: 20}", "recipe: {name: digits, epochs: 3}")
    cli_refuses(work, text, "sweep.scheduler.grace_period (4) is more than recipe.epochs (3)")


def test_cli_search_step_zero(work) -> None:
    cli_refuses(work, base_yaml(search={"method.T": {"low": 1.0, "high": 4.0, "step": 0}}),
                "search.method.T: step must be > 0")


def test_cli_momentum_zero_with_nesterov(work) -> None:
    cli_refuses(work, base_yaml(recipe={"name": "digits", "epochs": 3, "momentum": 0}),
                "nesterov needs momentum > 0")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cli_gpus_without_cuda(work) -> None:
    cli_refuses(work, base_yaml(sweep={"gpus_per_trial": 1}), "sweep.gpus_per_trial: 1 GPU per trial")


def test_cli_more_cpus_than_the_machine(work) -> None:
    cpus = int(preflight.local_cpu_count()) + 1
    cli_refuses(work, base_yaml(sweep={"cpus_per_trial": cpus}), f"sweep.cpus_per_trial: {cpus} CPUs per trial")


def test_cli_cifar_root_without_files(work) -> None:
    cli_refuses(work, base_yaml(data={"name": "cifar10", "root": str(work / "cifar")}),
                "data (cifar10): cannot be loaded: cifar10 files not found in")


def test_cli_cifar_batch_of_the_wrong_shape(work) -> None:
    write_cifar(work / "cifar", 10, n_train=50, n_test=10)
    broken = _batch(np.random.default_rng(0), 10, 10, ["labels"], "training batch 1 of 5")
    broken["data"] = broken["data"][:, :1000]
    _dump(work / "cifar" / CIFAR10_FOLDER / "data_batch_1", broken)
    cli_refuses(work, base_yaml(data={"name": "cifar10", "root": str(work / "cifar")}),
                f"cannot be loaded: CIFAR file {work / 'cifar' / CIFAR10_FOLDER / 'data_batch_1'}")


def test_cli_image_folder_missing(work) -> None:
    data = {"name": "image_folder", "train_dir": str(work / "absent"), "val_dir": str(work / "absent")}
    cli_refuses(work, base_yaml(data=data), "is not a directory")


def test_cli_image_folder_without_images(work) -> None:
    (work / "images" / "cat").mkdir(parents=True)
    data = {"name": "image_folder", "train_dir": str(work / "images"), "val_dir": str(work / "images")}
    cli_refuses(work, base_yaml(data=data), "needs one sub-folder of images per class")


def test_cli_deleted_experiment(work) -> None:
    deleted_experiment(work / "work" / "mlflow.db")
    cli_refuses(work, base_yaml(), "tracking.experiment 'kdsweep' is deleted (in MLflow's trash)")
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'work' / 'mlflow.db'}")
    experiments = client.search_experiments(view_type=ViewType.ALL)
    assert not client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)
