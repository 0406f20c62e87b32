"""`kdsweep validate`, `kdsweep list` and `--set PATH=VALUE` (issue 17): the real app on the real
spec files in sweeps/specs, a real CLI process for plugins, and one tiny real sweep run with
`--set` whose recorded spec, trial count and stage store show that the overrides took effect."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kd_core.data import DATASETS
from kd_core.distillers import DISTILLERS
from kd_core.models import MODELS
from kd_core.recipes import RECIPES
from sweeps.cli import app
from sweeps.cli.jobs import job_spec_file
from sweeps.spec import SpecError, load_spec
from sweeps.spec.overrides import apply_overrides
from tests.sweep_cli import kdsweep

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "sweeps" / "specs"
DIGITS_KD = SPECS / "digits_kd.yaml"
runner = CliRunner()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty working directory (validate must leave it empty) without MLFLOW_TRACKING_URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    (line,) = lines(result.output)
    assert line.startswith("error: ") and message in line, line
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- --set, on the spec


def test_set_changes_values_before_validation() -> None:
    spec = load_spec(DIGITS_KD, overrides=[
        "sweep.num_trials=3",
        "search.method.T.low=2",  # a dotted key of `search`
        "search.recipe.weight_decay={low: 1e-5, high: 1e-3, log: true}",  # a new searched parameter
        "method.params.T=5e-1",  # YAML 1.2 number, as in spec files
        "teacher.recipe.epochs=2",
        "assistants=[{name: convnet, args: {width: 8}}]",
        "assistants.0.args.width=9",  # a list item by index
        "description=first",
        "description=changed on the command line",  # a later item wins
    ])
    original = load_spec(DIGITS_KD)
    assert spec.sweep.num_trials == 3 and original.sweep.num_trials != 3
    assert (spec.search["method.T"].low, spec.search["method.T"].high) == (2.0, original.search["method.T"].high)
    assert spec.search["recipe.weight_decay"].log and spec.search["recipe.weight_decay"].low == 1e-5
    assert spec.method.params["T"] == 0.5
    assert spec.teacher.recipe.build().epochs == 2
    assert [a.args["width"] for a in spec.assistants] == [9]
    assert spec.description == "changed on the command line"
    # everything not set is the file's
    assert spec.student == original.student and spec.data == original.data


@pytest.mark.parametrize(("item", "message"), [
    ("foo=1", "--set foo=1: unknown top-level key 'foo' (known: name, "),
    ("sweep.num_trials", "--set sweep.num_trials: expected PATH=VALUE"),
    ("=4", "--set =4: expected PATH=VALUE"),
    ("sweep..seed=1", "--set sweep..seed=1: empty key in the path"),
    ("sweep.num_trials=[1", "--set sweep.num_trials=[1: not valid YAML"),
    ("sweep.sampler={seed: 1, seed: 2}", "duplicate key 'seed'"),
    ("sweep.num_trials.low=1", "--set sweep.num_trials.low=1: sweep.num_trials is 24, not a mapping"),
    ("search.method.kl_reduction.choices.5=sum",
     "search.method.kl_reduction.choices is a list of 2: '5' is not an index in it (0 to 1)"),
])
def test_set_refuses_malformed_items_naming_them(item, message) -> None:
    with pytest.raises(SpecError) as raised:
        load_spec(DIGITS_KD, overrides=[item])
    assert message in str(raised.value)


def test_set_values_are_validated_like_the_spec_file() -> None:
    with pytest.raises(SpecError, match=r"\(with 1 --set\):\s+sweep.num_trials: Input should be greater"):
        load_spec(DIGITS_KD, overrides=["sweep.num_trials=0"])
    with pytest.raises(SpecError, match="unknown architecture 'nope'"):
        load_spec(DIGITS_KD, overrides=["student.arch.name=nope"])
    with pytest.raises(SpecError, match="sweep.confirm.colour: Extra inputs are not permitted"):
        load_spec(DIGITS_KD, overrides=["sweep.confirm.colour=red"])


def test_set_leaves_the_parsed_file_untouched() -> None:
    data = yaml.safe_load(DIGITS_KD.read_text())
    changed = apply_overrides(data, ["sweep.num_trials=2", "teacher.recipe.epochs=1"])
    assert changed["sweep"]["num_trials"] == 2 and data["sweep"]["num_trials"] == 24
    assert data == yaml.safe_load(DIGITS_KD.read_text())


# ---------------------------------------------------------------- validate


@pytest.mark.parametrize("name", ["digits_kd.yaml", "digits_all_methods.yaml"])
def test_validate_prints_space_methods_stages_and_epochs(work, name) -> None:
    result = runner.invoke(app, ["validate", str(SPECS / name)])
    assert result.exit_code == 0, result.output
    spec = load_spec(SPECS / name)
    text = result.output
    assert f"spec {spec.name} ({SPECS / name}): valid" in text
    assert f"search space ({len(spec.search)} parameters):" in text
    for path in spec.search:
        assert f"  {path} " in text
    for method in spec.candidate_methods():  # each with its source: its module's docstring opens with it
        source = inspect.getmodule(DISTILLERS.get(method)).__doc__.splitlines()[0]
        assert any(line.split()[:1] == [method] and source in line for line in text.splitlines()), (method, source)
    stage_lines = [line.split() for line in text.splitlines() if line.startswith("  train ")]
    roles = {words[1] for words in stage_lines}
    assert {"teacher", "baseline"} <= roles  # nothing stored in this empty folder: all to train
    if "takd" in spec.candidate_methods():
        assert {"assistant", "sftn_teacher", "lw_teacher"} <= roles
    assert "epochs, at most: " in text
    assert list(work.iterdir()) == []  # validate writes nothing: no store, no stage folder


def test_validate_json_has_the_plan_and_an_epoch_bound(work) -> None:
    sets = ["sweep.num_trials=3", "sweep.confirm.top_k=1", "sweep.confirm.seeds=2", "teacher.recipe.epochs=5"]
    result = runner.invoke(app, ["validate", str(DIGITS_KD), "--json", *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    spec = load_spec(DIGITS_KD, overrides=sets)
    assert report["valid"] and report["spec"] == spec.name and report["sweep"]["num_trials"] == 3
    assert [p["path"] for p in report["search"]] == list(spec.search)
    assert report["search"][0]["type"] == "float"  # resolved: the file gives no type
    assert [m["name"] for m in report["methods"]] == ["kd"] and "Hinton" in report["methods"][0]["source"]
    teacher = next(s for s in report["stages"] if s["role"] == "teacher")
    assert teacher["status"] == "train" and teacher["epochs"] == 5
    epochs = spec.recipe.build().epochs
    assert report["epochs"] == {"trials": 3 * epochs, "epochs_per_trial": epochs, "stages": 5 + epochs,
                                "confirmation": 1 * 2 * epochs, "total": 3 * epochs + 5 + epochs + 2 * epochs}
    assert report["data"]["train"] > 0 and report["data"]["num_classes"] == 10


def test_validate_bad_spec_is_one_line_and_exit_2(work) -> None:
    bad = work / "bad.yaml"
    data = yaml.safe_load(DIGITS_KD.read_text())
    data["search"]["method.T"] = {"low": 3, "high": 1}
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_one_line_error(runner.invoke(app, ["validate", str(bad)]), "search.method.T: low (3.0) must be below high")
    assert_one_line_error(runner.invoke(app, ["validate", "nowhere.yaml"]), "spec file not found: nowhere.yaml")
    # the data check of `run` (preflight) runs too: a dataset whose files are missing
    assert_one_line_error(
        runner.invoke(app, ["validate", str(DIGITS_KD), "--set", "data={name: idx, root: /nonexistent/idx}"]),
        "data (idx): cannot be loaded: idx: IDX files not found in /nonexistent/idx")
    assert list(work.iterdir()) == [bad]


def test_validate_and_run_refuse_bad_set_items_in_one_line(work) -> None:
    for command in ("validate", "run", "submit"):
        assert_one_line_error(runner.invoke(app, [command, str(DIGITS_KD), "--set", "foo=1"]),
                              "--set foo=1: unknown top-level key 'foo'")
        assert_one_line_error(runner.invoke(app, [command, str(DIGITS_KD), "--set", "sweep.num_trials=many"]),
                              "sweep.num_trials: Input should be a valid integer")
    assert list(work.iterdir()) == []


# ---------------------------------------------------------------- list


def _defaults(entries: list[dict], name: str, key: str) -> dict:
    entry = next(e for e in entries if e["name"] == name)
    return {p["name"]: p.get("default") for p in entry[key]}


def test_list_every_kind_from_the_registries(work) -> None:
    for kind, registry in (("methods", DISTILLERS), ("architectures", MODELS), ("datasets", DATASETS),
                           ("recipes", RECIPES)):
        text = runner.invoke(app, ["list", kind])
        assert text.exit_code == 0, text.output
        assert text.output.startswith(f"{kind} ({len(registry.names())}):")
        listed = runner.invoke(app, ["list", kind, "--json"])
        entries = json.loads(listed.stdout)
        assert [e["name"] for e in entries] == registry.names()
    kd = {f.name: f.default for f in dataclasses.fields(DISTILLERS.get("kd").Params)}
    assert _defaults(json.loads(runner.invoke(app, ["list", "methods", "--json"]).stdout), "kd", "params") == kd
    assert f"T={kd['T']}" in runner.invoke(app, ["list", "methods"]).output
    width = inspect.signature(MODELS.get("convnet")).parameters["width"].default
    assert _defaults(json.loads(runner.invoke(app, ["list", "architectures", "--json"]).stdout),
                     "convnet", "args")["width"] == width
    val_fraction = inspect.signature(DATASETS.get("digits")).parameters["val_fraction"].default
    assert f"val_fraction={val_fraction}" in runner.invoke(app, ["list", "datasets"]).output
    assert f"epochs={RECIPES.get('digits').epochs}" in runner.invoke(app, ["list", "recipes"]).output


def test_list_shows_plugins_in_a_real_process() -> None:
    done = kdsweep("list", "methods", "--plugin", "tests.plugins.faulty", "--json", cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    entries = {e["name"]: e for e in json.loads(done.stdout)}
    assert {"test_nan", "test_raise"} <= set(entries) and "kd" in entries
    assert entries["test_nan"]["module"] == "tests.plugins.faulty"
    assert {p["name"]: p["default"] for p in entries["test_nan"]["params"]}["fail_after_steps"] == 20
    missing = kdsweep("list", "methods", "--plugin", "no_such_plugin", cwd=ROOT, timeout=300)
    assert missing.returncode == 2
    assert lines(missing.stderr) == ["error: --plugin: cannot import plugin 'no_such_plugin': "
                                     "No module named 'no_such_plugin'"]


def test_list_unknown_kind_is_exit_2(work) -> None:
    result = runner.invoke(app, ["list", "things"])
    assert_one_line_error(result, "'things' is not one of 'methods', 'architectures', 'datasets', 'recipes'")


# ---------------------------------------------------------------- submit --set


def test_submit_job_carries_the_overridden_spec(tmp_path) -> None:
    """What `kdsweep submit --set` ships to the cluster: a spec file with the items applied, which
    the job's `kdsweep run` loads to the same validated spec (checked without a cluster)."""
    sets = ["sweep.num_trials=2", "search.method.T.high=6", "teacher.recipe.epochs=3"]
    carried = job_spec_file(DIGITS_KD, sets, tmp_path)
    assert carried.parent == tmp_path and carried.name == DIGITS_KD.name
    assert load_spec(carried).model_dump() == load_spec(DIGITS_KD, overrides=sets).model_dump()
    assert load_spec(carried).sweep.num_trials == 2
    assert job_spec_file(DIGITS_KD, [], tmp_path) == DIGITS_KD  # no --set: the file itself


# ---------------------------------------------------------------- a real sweep run with --set

RUN_SETS = ["sweep.num_trials=1", "recipe.epochs=1", "teacher.recipe.epochs=1", "teacher.arch.args.width=8",
            "sweep.scheduler.grace_period=1", "sweep.confirm.top_k=0", "tracking.experiment=cli_tools",
            "tracking.registered_model=cli_tools_student"]


@pytest.fixture(scope="module")
def set_sweep(tmp_path_factory) -> dict:
    """digits_kd.yaml as shipped, cut down to one 1-epoch trial by `--set` alone, in a real process."""
    from sweeps.tracking import Tracker

    work = tmp_path_factory.mktemp("set_sweep")
    done = kdsweep("run", str(DIGITS_KD), "--name", "cli_set", *[a for s in RUN_SETS for a in ("--set", s)],
                   cwd=work, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    tracker = Tracker(f"sqlite:///{work / 'mlflow.db'}")
    (parent,) = tracker.find_sweeps("cli_set")
    return {"work": work, "tracker": tracker, "parent": parent}


def test_run_with_set_records_the_overridden_sweep(set_sweep) -> None:
    tracker, parent, work = set_sweep["tracker"], set_sweep["parent"], set_sweep["work"]
    assert parent.data.params["num_trials"] == "1"  # the file says 24
    assert len(tracker.children(parent.info.run_id, "trial")) == 1
    recorded = yaml.safe_load((work / "kdsweep_storage" / "cli_set" / "spec.yaml").read_text())
    assert recorded["recipe"]["epochs"] == 1 and recorded["teacher"]["recipe"]["epochs"] == 1
    assert recorded["teacher"]["arch"]["args"]["width"] == 8
    assert tracker.client.get_experiment(parent.info.experiment_id).name == "cli_tools"
    (teacher,) = tracker.children(parent.info.run_id, "teacher")
    assert teacher.data.params["arch"] == "convnet(depth=2,width=8)"


def test_validate_says_which_stages_the_store_already_has(set_sweep, monkeypatch) -> None:
    """The same spec and --set items against the finished sweep's storage: its teacher is reused."""
    work = set_sweep["work"]
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["validate", str(DIGITS_KD), *[a for s in RUN_SETS for a in ("--set", s)]]
    report = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    teacher = next(s for s in report["stages"] if s["role"] == "teacher")
    assert (work / "kdsweep_storage" / "stages" / teacher["key"]).is_dir()
    assert teacher["status"] == "reuse"
    assert teacher["note"] == f"found in {Path('kdsweep_storage') / 'stages' / teacher['key']}"
    assert report["epochs"]["stages"] == 1  # only the baseline is left to train (1 epoch)
    text = runner.invoke(app, args)
    assert any(line.startswith("  reuse   teacher ") for line in text.output.splitlines()), text.output
