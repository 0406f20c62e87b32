"""The bad-input table (issue 13): every mistake a user can make with a spec, an argument, a file,
a URI, a resource or a store is refused before anything starts, the same way: exit status 2, one
line on stderr naming the field or path, no traceback, nothing written, and the workspace's earlier
finished sweep (its MLflow runs, stages, export and registered model) left exactly as it was.

Cases run in this process through Typer's CliRunner against one workspace that holds a small real
finished sweep (a copy of the session's digits sweep, its paths rewritten to the copy). Each case writes its inputs into its own folder first;
then a listing of every file under the test's root is taken before and after the command. Should a
case ever get past the checks, it is stopped at the door (`_in_ray_session`, `cluster.local.up`,
`os.execv`, `cluster.jobs.submit` raise), so it fails fast instead of starting Ray. A few cases also
run as a real process for the real exit status and stderr.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import cluster.jobs
import cluster.local
import sweeps.cli.sweep
from sweeps.cli import app
from sweeps.cli.app import MAX_MESSAGE
from sweeps.tracking import Tracker
from tests.cifar_files import write_cifar
from tests.sweep_cli import MODEL, NAME, kdsweep

SWEEP = NAME  # the finished sweep in the workspace (the session's digits sweep, copied)
DELETED_EXPERIMENT = "gone"  # a soft-deleted MLflow experiment in the workspace's store
SPEC: dict[str, Any] = {
    "name": "tiny",
    "teacher": {"arch": {"name": "convnet", "args": {"width": 8, "depth": 1}},
                "recipe": {"name": "digits", "epochs": 2}},
    "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
    "method": {"name": "kd"},
    "recipe": {"name": "digits", "epochs": 2},
    "search": {"method.T": {"low": 1.0, "high": 8.0}},
    "sweep": {"num_trials": 2, "max_concurrent": 2, "scheduler": {"type": "none"}},
    "tracking": {"experiment": "tiny", "registered_model": "tiny_student"},
}
DELETE = object()  # in a spec change: remove the key


# --- building the cases ---------------------------------------------------------------------------

@dataclass
class Case:
    """One bad input: `make(folder)` writes what it needs into its own empty folder and returns
    the command's arguments; `expect` must appear in the one error line."""

    id: str
    make: Callable[[Path], list[str]]
    expect: str
    marks: list[Any] = field(default_factory=list)


def changed(changes: dict[str, Any]) -> dict[str, Any]:
    """SPEC with `changes` applied: dotted paths to new values (DELETE removes the key)."""
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, last = path.split("/") if "/" in path else path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


def spec_case(case_id: str, changes: dict[str, Any], expect: str, *args: str) -> Case:
    """`kdsweep run` of SPEC with `changes` (paths use '.', or '/' when a key holds a dot:
    'search/method.T/low')."""

    def make(folder: Path) -> list[str]:
        path = folder / "spec.yaml"
        path.write_text(yaml.safe_dump(changed(changes), sort_keys=False))
        return ["run", str(path), *args]

    return Case(case_id, make, expect)


def text_case(case_id: str, text: str | bytes, expect: str, file_name: str = "spec.yaml") -> Case:
    """`kdsweep run` of a spec file with exactly this content."""

    def make(folder: Path) -> list[str]:
        path = folder / file_name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["run", str(path)]

    return Case(case_id, make, expect)


def cli_case(case_id: str, args: list[str], expect: str) -> Case:
    """A command line; `{in}` in an argument is the case's own folder."""
    return Case(case_id, lambda folder: [a.replace("{in}", str(folder)) for a in args], expect)


def file_case(case_id: str, make: Callable[[Path], list[str]], expect: str) -> Case:
    return Case(case_id, make, expect)


class Payload:
    """Unpickled, it creates the file `marker`: a stand-in for code a file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def payload_weights(path: Path) -> Path:
    torch.save({"weight": Payload(path.parent / "MARKER")}, path)
    return path


def garbage(path: Path, size: int = 4096) -> Path:
    path.write_bytes(bytes(range(256)) * (size // 256))
    return path


def truncated_weights(path: Path) -> Path:
    torch.save({"weight": torch.zeros(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:3000])
    return path


def read_only(folder: Path) -> Path:
    """`folder`, made unwritable even for root (chattr +i where mode bits do not bind root)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode != 0 or os.access(folder, os.W_OK):
            pytest.skip(f"cannot make a read-only folder here ({done.stderr.decode().strip()})")
    return folder


def writable_again(root: Path) -> None:
    """Undo `read_only` under `root` so the temporary folders can be removed."""
    for folder, _, _ in os.walk(root):
        path = Path(folder)
        if not os.access(path, os.W_OK) or path.stat().st_mode & 0o200 == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            path.chmod(0o755)


def cifar_root(folder: Path, spoil: Callable[[Path], Any]) -> Path:
    """Small CIFAR-10 files under `folder`/cifar, each batch file then passed to `spoil`."""
    root = write_cifar(folder / "cifar", 10, n_train=50, n_test=10)
    for batch in sorted((root / "cifar-10-batches-py").iterdir()):
        spoil(batch)
    return root


def cifar_payload(batch: Path) -> None:
    with batch.open("wb") as file:
        pickle.dump({"data": Payload(batch.parent / "MARKER"), "labels": [0]}, file, protocol=2)


def cifar_wrong_shape(batch: Path) -> None:
    with batch.open("wb") as file:
        pickle.dump({"data": torch.zeros(5, 7, dtype=torch.uint8).numpy(), "labels": [0] * 5,
                     "label_names": ["x"] * 10}, file, protocol=2)


def empty_image_folders(folder: Path) -> dict[str, Any]:
    """The `data:` of an image folder dataset whose class folders hold no images."""
    for split in ("train", "val"):
        (folder / split / "a").mkdir(parents=True)
    return {"name": "image_folder", "train_dir": str(folder / "train"), "val_dir": str(folder / "val")}


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def alias_bomb(levels: int) -> str:
    """A spec of about 1 KB whose `choices` expand, through nested YAML aliases, to 9**levels strings."""
    bomb = "&x0 [" + ",".join(['"lol"'] * 9) + "]"
    for level in range(1, levels):
        bomb = f"&x{level} [{bomb}," + ",".join([f"*x{level - 1}"] * 8) + "]"
    spec = yaml.safe_dump(changed({"search/method.kl_reduction": "BOMB"}), sort_keys=False)
    return spec.replace("method.kl_reduction: BOMB", f"method.kl_reduction: {{choices: {bomb}}}")


def run_spec_with(folder: Path, changes: dict[str, Any], *args: str) -> list[str]:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(changed(changes), sort_keys=False))
    return ["run", str(path), *args]


def foreign_pull_dir(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    (folder / "out" / "notes.txt").write_text("mine")
    return ["pull", SWEEP, "--to", str(folder / "out")]


def changed_pull_dir(folder: Path) -> list[str]:
    """A folder an earlier pull wrote, one of whose files the user changed since."""
    out = folder / "out"
    out.mkdir()
    (out / "student.json").write_text('{"edited": true}')
    (out / ".kdsweep-pull.json").write_text('{"files": {"student.json": "0000"}}')
    return ["pull", SWEEP, "--to", str(out)]


def damaged_record_dir(folder: Path) -> list[str]:
    out = folder / "out"
    out.mkdir()
    (out / "student.json").write_text("{}")
    (out / ".kdsweep-pull.json").write_text("[not json")
    return ["pull", SWEEP, "--to", str(out)]


def foreign_sqlite(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE recipes (name TEXT)")
    return path


def store(folder: Path, make: Callable[[Path], Path], command: list[str]) -> list[str]:
    """`command` with `--tracking-uri` a store file made by `make`."""
    return [*command, "--tracking-uri", f"sqlite:///{make(folder / 'mlflow.db')}"]


def truncated_store(path: Path) -> Path:
    source = Path("mlflow.db").read_bytes()  # the workspace's store (cwd)
    path.write_bytes(source[: len(source) // 3])
    return path


def label(command: list[str]) -> str:
    """A case id's prefix for a reading command: `status` (all sweeps) or `status-name` (one)."""
    return "status-name" if command == ["status", SWEEP] else command[0]


HAS_CUDA = torch.cuda.is_available()
READERS = [["status"], ["status", SWEEP], ["best", SWEEP], ["pull", SWEEP, "--to", "{in}/out"],
           ["promote", SWEEP], ["resume", SWEEP]]
BAD_URIS = [  # (id, URI, expected)
    ("unknown-scheme", "foo://bar", "unknown scheme 'foo://'"),
    ("file-store", "file:./mlruns", "does not accept file stores"),
    ("bare-path", "mlruns", "does not accept file stores"),
    ("postgresql-no-driver", "postgresql://kd:secret@127.0.0.1:9/kd", "pip install psycopg"),
    ("mysql-no-driver", "mysql://kd@127.0.0.1:9/kd", "pip install mysqlclient"),
    ("mssql-no-driver", "mssql://kd@127.0.0.1:9/kd", "pip install pyodbc"),
    ("postgresql-unknown-driver", "postgresql+nodriver://kd@127.0.0.1/kd", "not a valid database URI"),
    ("server-refused", "http://127.0.0.1:9", "http://127.0.0.1:9 is not reachable"),
    ("server-refused-path", "http://127.0.0.1:9/mlflow", "is not reachable"),
    ("sqlite-missing-dir", "sqlite:////nonexistent/dir/m.db", "/nonexistent/dir"),
]

CASES: list[Case] = [
    # --- spec fields: unknown keys, wrong types, out of range -----------------------------------
    spec_case("spec-unknown-key", {"colour": "red"}, "colour"),
    spec_case("spec-name-spaces", {"name": "a b"}, "name"),
    spec_case("spec-name-type", {"name": ["x"]}, "name"),
    spec_case("spec-description-type", {"description": ["x"]}, "description"),
    spec_case("spec-plugins-type", {"plugins": "sweeps.nothing"}, "plugins"),
    spec_case("spec-plugin-missing", {"plugins": ["no_such_plugin_xyz"]}, "no_such_plugin_xyz"),
    spec_case("data-unknown", {"data": {"name": "mnist_of_doom"}}, "mnist_of_doom"),
    spec_case("data-unknown-arg", {"data": {"name": "digits", "colour": 1}}, "colour"),
    spec_case("data-arg-type", {"data": {"name": "digits", "val_fraction": "lots"}}, "val_fraction"),
    spec_case("data-val-fraction-range", {"data": {"name": "digits", "val_fraction": 1.5}}, "val_fraction"),
    spec_case("data-test-fraction-negative", {"data": {"name": "digits", "test_fraction": -0.1}}, "test_fraction"),
    spec_case("teacher-missing", {"teacher": DELETE}, "needs a teacher"),
    spec_case("teacher-arch-unknown", {"teacher.arch.name": "resnet9"}, "resnet9"),
    spec_case("teacher-arch-arg-range", {"teacher.arch.args.width": -3}, "width"),
    spec_case("teacher-arch-arg-unknown", {"teacher.arch.args.colour": 1}, "colour"),
    spec_case("teacher-arch-missing", {"teacher.arch": DELETE}, "arch"),
    spec_case("teacher-recipe-unknown", {"teacher.recipe.name": "sous_vide"}, "sous_vide"),
    spec_case("teacher-recipe-epochs", {"teacher.recipe.epochs": 0}, "epochs"),
    spec_case("teacher-seed-type", {"teacher.seed": "zero"}, "teacher.seed"),
    spec_case("teacher-key-without-file", {"teacher.checkpoint_key": "model"}, "checkpoint_key"),
    spec_case("teacher-model-uri-scheme", {"teacher.model_uri": "http://models/x", "teacher.recipe": DELETE},
              "model_uri"),
    spec_case("teacher-model-uri-unknown", {"teacher.model_uri": "models:/no_such_model@champion",
                                            "teacher.recipe": DELETE, "teacher.arch": DELETE}, "no_such_model"),
    spec_case("teacher-checkpoint-missing", {"teacher.checkpoint": "/nonexistent/teacher.pt",
                                             "teacher.recipe": DELETE}, "/nonexistent/teacher.pt"),
    spec_case("student-missing", {"student": DELETE}, "student"),
    spec_case("student-arch-unknown", {"student.arch.name": "resnet9000"}, "resnet9000"),
    spec_case("student-arch-depth", {"student.arch.args.depth": 0}, "depth"),
    spec_case("student-key-without-file", {"student.checkpoint_key": "model"}, "checkpoint_key"),
    spec_case("student-init-missing", {"student.init_checkpoint": "/nonexistent/student.pt"},
              "/nonexistent/student.pt"),
    spec_case("assistants-type", {"assistants": "big"}, "assistants"),
    spec_case("assistants-unknown-arch", {"assistants": [{"name": "resnet9"}]}, "resnet9"),
    spec_case("method-unknown", {"method.name": "fitnet"}, "unknown method 'fitnet'"),
    spec_case("method-param-range", {"method.params": {"T": -1.0}}, "T"),
    spec_case("method-param-type", {"method.params": {"T": "hot"}}, "T"),
    spec_case("method-param-unknown", {"method.params": {"colour": 1}}, "colour"),
    spec_case("method-param-choice", {"method.params": {"kl_reduction": "sum"}}, "kl_reduction"),
    spec_case("method-weights-all-zero", {"method.params": {"w_kd": 0.0, "w_ce": 0.0}}, "w_kd"),
    spec_case("method-takd-too-many-assistants",
              {"method": {"name": "takd", "params": {"num_assistants": 5}},
               "assistants": [{"name": "convnet", "args": {"width": 6, "depth": 1}}]}, "assistants"),
    spec_case("recipe-unknown", {"recipe.name": "sous_vide"}, "sous_vide"),
    spec_case("recipe-epochs-negative", {"recipe.epochs": -1}, "epochs must be >= 1"),
    spec_case("recipe-epochs-type", {"recipe.epochs": "ten"}, "epochs"),
    spec_case("recipe-lr-zero", {"recipe.lr": 0}, "lr"),
    spec_case("recipe-batch-zero", {"recipe.batch_size": 0}, "batch_size"),
    spec_case("recipe-batch-huge", {"recipe.batch_size": 10**12}, "batch_size"),
    spec_case("recipe-unknown-field", {"recipe.colour": 1}, "colour"),
    spec_case("recipe-momentum-zero-nesterov", {"recipe.momentum": 0.0}, "momentum"),
    spec_case("asha-grace-above-epochs", {"recipe.epochs": 3,
                                         "sweep.scheduler": {"type": "asha", "grace_period": 4}}, "grace_period"),
    spec_case("search-empty", {"search": {}}, "the search space is empty"),
    spec_case("search-missing", {"search": DELETE}, "search"),
    spec_case("search-low-above-high", {"search/method.T": {"low": 3, "high": 1}}, "search.method.T: low"),
    spec_case("search-low-equals-high", {"search/method.T": {"low": 2, "high": 2}}, "search.method.T"),
    spec_case("search-no-high", {"search/method.T": {"low": 2}}, "high"),
    spec_case("search-empty-choices", {"search/method.T": {"choices": []}}, "choices"),
    spec_case("search-choices-and-range", {"search/method.T": {"choices": [1], "low": 1, "high": 2}}, "choices"),
    spec_case("search-log-from-zero", {"search/method.T": {"low": 0, "high": 2, "log": True}}, "log"),
    spec_case("search-log-and-step", {"search/method.T": {"low": 1, "high": 2, "log": True, "step": 0.5}}, "step"),
    spec_case("search-step-zero", {"search/method.T": {"low": 1, "high": 2, "step": 0}}, "step"),
    spec_case("search-step-negative", {"search/method.T": {"low": 1, "high": 2, "step": -0.5}}, "step"),
    spec_case("search-int-fraction", {"search/method.T": {"type": "int", "low": 1.5, "high": 4}}, "int"),
    spec_case("search-type-unknown", {"search/method.T": {"type": "complex", "low": 1, "high": 2}}, "type"),
    spec_case("search-range-invalid-value", {"search/method.T": {"low": -1, "high": 2}}, "search.method.T"),
    spec_case("search-unknown-key", {"search/method.T": {"lo": 1, "high": 2}}, "lo"),
    spec_case("search-unknown-param", {"search/method.colour": {"low": 1, "high": 2}}, "colour"),
    spec_case("search-bad-prefix", {"search/loss.T": {"low": 1, "high": 2}}, "searchable paths"),
    spec_case("search-recipe-range", {"search/recipe.lr": {"low": -1, "high": 0.1}}, "search.recipe.lr"),
    spec_case("search-recipe-unknown", {"search/recipe.colour": {"low": 1, "high": 2}}, "search.recipe.colour"),
    spec_case("search-student-arg-range", {"search/student.args.width": {"type": "int", "low": 0, "high": 4}},
              "search.student.args.width"),
    spec_case("search-student-arg-unknown", {"search/student.args.colour": {"low": 1, "high": 2}}, "colour"),
    spec_case("search-method-unknown", {"search/method.name": {"choices": ["kd", "fitnet"]}}, "fitnet"),
    spec_case("search-method-range", {"search/method.name": {"low": 1, "high": 2}}, "method.name"),
    spec_case("search-when-forward", {"search/method.T": {"low": 1, "high": 2, "when": {"method.w_kd": 0.5}},
                                      "search/method.w_kd": {"low": 0.1, "high": 1}}, "when"),
    spec_case("sweep-num-trials-zero", {"sweep.num_trials": 0}, "num_trials"),
    spec_case("sweep-num-trials-type", {"sweep.num_trials": "many"}, "sweep.num_trials"),
    spec_case("sweep-num-trials-huge", {"sweep.num_trials": 1e20}, "num_trials"),
    spec_case("sweep-max-concurrent-zero", {"sweep.max_concurrent": 0}, "max_concurrent"),
    spec_case("sweep-cpus-zero", {"sweep.cpus_per_trial": 0}, "cpus_per_trial"),
    spec_case("sweep-cpus-above-machine", {"sweep.cpus_per_trial": 64}, "cpus_per_trial"),
    spec_case("sweep-gpus-negative", {"sweep.gpus_per_trial": -1}, "gpus_per_trial"),
    *([] if HAS_CUDA else [spec_case("sweep-gpus-without-cuda", {"sweep.gpus_per_trial": 1}, "gpus_per_trial")]),
    spec_case("sweep-precision", {"sweep.precision": "float8"}, "precision"),
    spec_case("sweep-channels-last-type", {"sweep.channels_last": "maybe"}, "channels_last"),
    spec_case("sweep-cache-views-zero", {"sweep.teacher_cache": {"views": 0}}, "views"),
    spec_case("sweep-cache-dtype", {"sweep.teacher_cache": {"dtype": "int8"}}, "dtype"),
    spec_case("sweep-cache-unknown", {"sweep.teacher_cache": {"colour": 1}}, "colour"),
    spec_case("sweep-seed-type", {"sweep.seed": "zero"}, "sweep.seed"),
    spec_case("sweep-max-failures", {"sweep.max_failures": -1}, "max_failures"),
    spec_case("sweep-sampler-type", {"sweep.sampler": {"type": "grid"}}, "sampler"),
    spec_case("sweep-sampler-startup", {"sweep.sampler": {"n_startup_trials": -1}}, "n_startup_trials"),
    spec_case("sweep-scheduler-type", {"sweep.scheduler": {"type": "pbt"}}, "scheduler"),
    spec_case("sweep-scheduler-grace-zero", {"sweep.scheduler": {"type": "asha", "grace_period": 0}}, "grace_period"),
    spec_case("sweep-scheduler-reduction", {"sweep.scheduler": {"type": "asha", "reduction_factor": 1}},
              "reduction_factor"),
    spec_case("sweep-confirm-top-k", {"sweep.confirm": {"top_k": -1}}, "top_k"),
    spec_case("sweep-confirm-seeds", {"sweep.confirm": {"top_k": 1, "seeds": 0}}, "seeds"),
    spec_case("sweep-objectives-verbatim", {"sweep.objectives": ["params"]},
              "objectives: [accuracy] or [accuracy, params | flops | latency]"),
    spec_case("sweep-objectives-asha", {"sweep.objectives": ["accuracy", "params"],
                                        "sweep.scheduler": {"type": "asha"}}, "ASHA"),
    spec_case("sweep-objectives-unknown", {"sweep.objectives": ["accuracy", "energy"]}, "objectives"),
    spec_case("sweep-initial-point-range", {"sweep.initial_points": [{"method.T": 100}]}, "initial_points"),
    spec_case("sweep-initial-point-unsearched", {"sweep.initial_points": [{"recipe.lr": 0.1}]}, "initial_points"),
    spec_case("sweep-unknown-key", {"sweep.colour": 1}, "colour"),
    spec_case("tracking-champion", {"tracking.champion": "sometimes"}, "champion"),
    spec_case("tracking-unknown-key", {"tracking.colour": 1}, "colour"),
    spec_case("tracking-deleted-experiment", {"tracking.experiment": DELETED_EXPERIMENT}, DELETED_EXPERIMENT),
    spec_case("tracking-bracketed-key", {"tracking": {"[params]": 1}}, "[params]"),
    # --- spec files ------------------------------------------------------------------------------
    cli_case("spec-file-missing", ["run", "{in}/nowhere.yaml"], "spec file not found"),
    cli_case("spec-file-is-folder", ["run", "{in}"], "spec file not found"),
    text_case("spec-not-yaml", "name: [unclosed\n", "not valid YAML"),
    text_case("spec-a-list", "- name: x\n", "mapping"),
    text_case("spec-empty", "", "mapping"),
    text_case("spec-not-utf8", yaml.safe_dump(changed({"description": "caf\u00e9"}), allow_unicode=True)
              .encode("latin-1"), "latin1.yaml", file_name="latin1.yaml"),
    text_case("spec-duplicate-key", yaml.safe_dump(changed({})) + "sweep: {num_trials: 3}\n", "duplicate"),
    text_case("spec-alias-bomb", alias_bomb(8), "bomb.yaml", file_name="bomb.yaml"),
    # --- files the spec names: weights, datasets ---------------------------------------------------
    file_case("teacher-checkpoint-garbage", lambda d: run_spec_with(d, {
        "teacher.checkpoint": str(garbage(d / "garbage.pt")), "teacher.recipe": DELETE}), "garbage.pt"),
    file_case("teacher-checkpoint-truncated", lambda d: run_spec_with(d, {
        "teacher.checkpoint": str(truncated_weights(d / "cut.pt")), "teacher.recipe": DELETE}), "cut.pt"),
    file_case("teacher-checkpoint-payload", lambda d: run_spec_with(d, {
        "teacher.checkpoint": str(payload_weights(d / "payload.pt")), "teacher.recipe": DELETE}), "payload.pt"),
    file_case("student-init-garbage", lambda d: run_spec_with(d, {
        "student.init_checkpoint": str(garbage(d / "garbage.pt"))}), "garbage.pt"),
    file_case("student-init-payload", lambda d: run_spec_with(d, {
        "student.init_checkpoint": str(payload_weights(d / "payload.pt"))}), "payload.pt"),
    file_case("tv-weights-missing", lambda d: run_spec_with(d, {
        "student.arch": {"name": "tv_resnet18", "args": {"weights_path": str(d / "none.pt")}}}), "none.pt"),
    file_case("tv-weights-garbage", lambda d: run_spec_with(d, {
        "student.arch": {"name": "tv_resnet18", "args": {"weights_path": str(garbage(d / "garbage.pt"))}}}),
        "garbage.pt"),
    file_case("tv-weights-payload", lambda d: run_spec_with(d, {
        "student.arch": {"name": "tv_resnet18", "args": {"weights_path": str(payload_weights(d / "payload.pt"))}}}),
        "payload.pt"),
    file_case("cifar-root-empty", lambda d: run_spec_with(d, {"data": {"name": "cifar10", "root": str(d)}}),
              "root"),
    file_case("cifar-garbage-batches", lambda d: run_spec_with(d, {"data": {
        "name": "cifar10", "root": str(cifar_root(d, garbage))}}), "cifar-10-batches-py"),
    file_case("cifar-payload-batches", lambda d: run_spec_with(d, {"data": {
        "name": "cifar10", "root": str(cifar_root(d, cifar_payload))}}), "cifar-10-batches-py"),
    file_case("cifar-wrong-shape", lambda d: run_spec_with(d, {"data": {
        "name": "cifar10", "root": str(cifar_root(d, cifar_wrong_shape))}}), "cifar-10-batches-py"),
    file_case("image-folder-missing", lambda d: run_spec_with(d, {"data": {
        "name": "image_folder", "train_dir": str(d / "none"), "val_dir": str(d / "none")}}), "train_dir"),
    file_case("image-folder-no-images", lambda d: run_spec_with(d, {"data": empty_image_folders(d)}),
              "image-folder-no-images/train"),
    file_case("idx-root-missing", lambda d: run_spec_with(d, {"data": {"name": "idx", "root": str(d / "none")}}),
              "idx-root-missing/none"),
    # --- run's arguments ---------------------------------------------------------------------------
    Case("run-num-trials-zero", lambda d: run_spec_with(d, {}, "--num-trials", "0"), "--num-trials"),
    Case("run-num-trials-type", lambda d: run_spec_with(d, {}, "--num-trials", "x"), "--num-trials"),
    Case("run-max-concurrent-zero", lambda d: run_spec_with(d, {}, "--max-concurrent", "0"), "--max-concurrent"),
    Case("run-name-spaces", lambda d: run_spec_with(d, {}, "--name", "a b"), "--name 'a b'"),
    Case("run-name-empty", lambda d: run_spec_with(d, {}, "--name", ""), "--name"),
    Case("run-name-taken", lambda d: run_spec_with(d, {}, "--name", SWEEP), f"a sweep named {SWEEP!r} already"),
    Case("run-unknown-option", lambda d: run_spec_with(d, {}, "--colour", "red"), "--colour"),
    Case("run-extra-argument", lambda d: run_spec_with(d, {}, "again.yaml"), "again.yaml"),
    cli_case("run-no-spec", ["run"], "SPEC.yaml"),
    Case("run-storage-file", lambda d: run_spec_with(d, {}, "--storage", str(garbage(d / "file"))), "not a directory"),
    Case("run-storage-read-only", lambda d: run_spec_with(d, {}, "--storage", str(read_only(d / "ro") / "st")),
         "is not writable"),
    Case("run-store-read-only", lambda d: run_spec_with(d, {}, "--tracking-uri",
                                                        f"sqlite:///{read_only(d / 'ro')}/m.db"), "is not writable"),
    Case("run-store-garbage", lambda d: store(d, garbage, run_spec_with(d, {})), "not an SQLite database"),
    Case("run-store-truncated", lambda d: store(d, truncated_store, run_spec_with(d, {})), "truncated"),
    Case("run-store-foreign", lambda d: store(d, foreign_sqlite, run_spec_with(d, {})), "not an MLflow"),
    *[Case(f"run-uri-{i}", lambda d, u=uri: run_spec_with(d, {}, "--tracking-uri", u), expect)
      for i, uri, expect in BAD_URIS],
    # --- the reading commands: unknown sweeps, bad stores -----------------------------------------
    cli_case("status-unknown-sweep", ["status", "ghost"], "no sweep named 'ghost'"),
    cli_case("best-unknown-sweep", ["best", "ghost"], "no sweep named 'ghost'"),
    cli_case("pull-unknown-sweep", ["pull", "ghost", "--to", "{in}/out"], "no sweep named 'ghost'"),
    cli_case("promote-unknown-sweep", ["promote", "ghost"], "no sweep named 'ghost'"),
    cli_case("resume-unknown-sweep", ["resume", "ghost"], "no sweep named 'ghost'"),
    cli_case("resume-finished", ["resume", SWEEP], "already finished"),
    cli_case("best-no-name", ["best"], "name"),
    cli_case("best-pareto-verbatim", ["best", SWEEP, "--pareto"], "`sweep.objectives: [accuracy, params]`"),
    cli_case("status-follow-without-job", ["status", "--follow"], "--follow"),
    cli_case("status-job-no-cluster", ["status", "--job", "j1", "--cluster-dir", "{in}/none"], "no --address"),
    cli_case("status-job-bad-address", ["status", "--job", "j1", "--address", "ftp://127.0.0.1"], "--address"),
    cli_case("status-store-missing", ["status", "--tracking-uri", "sqlite:///{in}/none.db"], "no sweeps recorded"),
    cli_case("status-store-is-folder", ["status", "--tracking-uri", "sqlite:///{in}"], "is a directory"),
    Case("status-store-empty-file", lambda d: store(d, empty_file, ["status"]), "no sweeps recorded"),
    *[Case(f"{label(command)}-store-{kind}", lambda d, c=command, m=make: store(d, m, [a.replace(
        "{in}", str(d)) for a in c]), expect)
      for command in READERS
      for kind, make, expect in [("garbage", garbage, "not an SQLite database"),
                                 ("truncated", truncated_store, "truncated"),
                                 ("foreign", foreign_sqlite, "not an MLflow")]],
    *[cli_case(f"{label(command)}-uri-{i}", [*command, "--tracking-uri", uri], expect)
      for command in READERS for i, uri, expect in BAD_URIS
      if i in ("unknown-scheme", "postgresql-no-driver", "server-refused")],
    # --- pull's folder (fault 5) ---------------------------------------------------------------------
    Case("pull-to-file", lambda d: ["pull", SWEEP, "--to", str(garbage(d / "file"))], "not a directory"),
    Case("pull-to-read-only", lambda d: ["pull", SWEEP, "--to", str(read_only(d / "ro") / "out")],
         "is not writable"),
    Case("pull-to-users-files", foreign_pull_dir, "notes.txt"),
    Case("pull-to-changed-pull", changed_pull_dir, "student.json"),
    Case("pull-to-damaged-record", damaged_record_dir, "student.json"),
    cli_case("pull-missing-to", ["pull", SWEEP], "--to"),
    cli_case("pull-trial-not-pareto", ["pull", SWEEP, "--to", "{in}/out", "--trial", "nope"], "'nope'"),
    # --- ui, submit, cluster -------------------------------------------------------------------------
    cli_case("ui-port-zero", ["ui", "--port", "0"], "--port"),
    cli_case("ui-port-range", ["ui", "--port", "70000"], "--port"),
    cli_case("ui-port-type", ["ui", "--port", "http"], "--port"),
    cli_case("ui-uri-unknown-scheme", ["ui", "--tracking-uri", "foo://bar"], "foo://"),
    cli_case("ui-store-missing-dir", ["ui", "--tracking-uri", "sqlite:////nonexistent/dir/m.db"], "/nonexistent/dir"),
    Case("submit-bad-spec", lambda d: ["submit", *run_spec_with(d, {"colour": 1})[1:]], "colour"),
    Case("submit-no-tracking", lambda d: ["submit", run_spec_with(d, {})[1], "--cluster-dir", str(d / "none")],
         "no tracking server"),
    Case("submit-local-store", lambda d: ["submit", run_spec_with(d, {})[1], "--tracking-uri", "sqlite:///m.db"],
         "sqlite:///m.db"),
    Case("submit-no-storage", lambda d: ["submit", run_spec_with(d, {})[1], "--tracking-uri", "http://127.0.0.1:9",
                                         "--cluster-dir", str(d / "none")], "--storage"),
    Case("submit-object-storage", lambda d: ["submit", run_spec_with(d, {})[1], "--tracking-uri",
                                             "http://127.0.0.1:9", "--storage", "s3://bucket/x"], "--storage"),
    Case("submit-no-cluster", lambda d: ["submit", run_spec_with(d, {})[1], "--tracking-uri", "http://127.0.0.1:9",
                                         "--storage", str(d / "st"), "--cluster-dir", str(d / "none")],
         "no --address"),
    Case("submit-bad-address", lambda d: ["submit", run_spec_with(d, {})[1], "--tracking-uri", "http://127.0.0.1:9",
                                          "--storage", str(d / "st"), "--address", "127.0.0.1:8265"], "--address"),
    Case("submit-working-dir-missing", lambda d: ["submit", run_spec_with(d, {})[1], "--tracking-uri",
                                                  "http://127.0.0.1:9", "--working-dir", str(d / "none")],
         "--working-dir"),
    Case("submit-num-trials-zero", lambda d: ["submit", run_spec_with(d, {})[1], "--num-trials", "0"],
         "--num-trials"),
    cli_case("cluster-up-workers-negative", ["cluster", "up", "--workers", "-1", "--dir", "{in}/c"], "--workers"),
    cli_case("cluster-up-workers-many", ["cluster", "up", "--workers", "251", "--dir", "{in}/c"], "--workers"),
    cli_case("cluster-up-cpus-zero", ["cluster", "up", "--num-cpus", "0", "--dir", "{in}/c"], "--num-cpus"),
    cli_case("cluster-up-port-range", ["cluster", "up", "--dashboard-port", "70000", "--dir", "{in}/c"],
             "--dashboard-port"),
    cli_case("cluster-up-timeout", ["cluster", "up", "--timeout", "1", "--dir", "{in}/c"], "--timeout"),
    cli_case("cluster-up-store-scheme", ["cluster", "up", "--backend-store-uri", "foo://bar", "--dir", "{in}/c"],
             "foo://"),
    cli_case("cluster-up-store-server", ["cluster", "up", "--backend-store-uri", "http://127.0.0.1:9",
                                         "--dir", "{in}/c"], "--backend-store-uri"),
    cli_case("cluster-up-store-driver", ["cluster", "up", "--backend-store-uri", "postgresql://kd@127.0.0.1/kd",
                                         "--dir", "{in}/c"], "pip install"),
    Case("cluster-up-dir-file", lambda d: ["cluster", "up", "--dir", str(garbage(d / "file"))], "not a directory"),
    Case("cluster-up-dir-read-only", lambda d: ["cluster", "up", "--dir", str(read_only(d / "ro") / "c")],
         "is not writable"),
    cli_case("cluster-down-nothing", ["cluster", "down", "--dir", "{in}/none"], "no cluster started"),
    cli_case("cluster-status-nothing", ["cluster", "status", "--dir", "{in}/none"], "no cluster started"),
    cli_case("cluster-unknown-command", ["cluster", "sideways"], "sideways"),
    cli_case("unknown-command", ["frobnicate"], "frobnicate"),
]


# --- the workspace -------------------------------------------------------------------------------

def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`: {relative path: (size, mtime_ns)} (folders: (-1, 0))."""
    found: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = (-1, 0)
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def registry_rows(uri: str) -> dict[str, Any]:
    """What the finished sweep recorded, row by row: its runs, their tags and metrics, the model."""
    tracker = Tracker(uri)
    (parent,) = tracker.find_sweeps(SWEEP)
    runs = [parent, *tracker.children(parent.info.run_id)]
    model = tracker.client.get_registered_model(MODEL)
    return {
        "runs": sorted((r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())),
                        tuple(sorted(r.data.metrics.items()))) for r in runs),
        "aliases": model.aliases,
        "versions": sorted((v.version, v.source) for v in tracker.client.search_model_versions(f"name='{MODEL}'")),
    }


def copy_workspace(source: Path, target: Path) -> str:
    """Copy a sweep's folder and point every path its MLflow store holds (artifact locations,
    model version sources, storage tags) at the copy; its tracking URI."""
    shutil.copytree(source, target)
    database = sqlite3.connect(target / "mlflow.db")
    with database:
        tables = [row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in database.execute(f"PRAGMA table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    database.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?)',
                                     (str(source), str(target)))
    database.close()
    return f"sqlite:///{target / 'mlflow.db'}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_sweep) -> Iterator[dict[str, Any]]:
    """A folder holding a finished sweep (SWEEP) and a soft-deleted experiment, with its hashes."""
    root = tmp_path_factory.mktemp("bad_input")
    work = root / "work"
    uri = copy_workspace(digits_sweep["work"], work)
    tracker = Tracker(uri)
    tracker.client.delete_experiment(tracker.client.create_experiment(DELETED_EXPERIMENT))
    (root / "in").mkdir()
    yield {"root": root, "work": work, "uri": uri, "digest": digest(work), "rows": registry_rows(uri)}
    writable_again(root)


@pytest.fixture
def in_workspace(workspace, monkeypatch) -> dict[str, Any]:
    """The workspace as the current directory, with no tracking URI in the environment, and every
    door past the checks shut: a case that gets there fails at once instead of starting Ray."""

    def shut(door: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"a bad input got past the checks: {door} was reached")
        return refuse

    monkeypatch.chdir(workspace["work"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sweeps.cli.sweep, "_in_ray_session", shut("Ray (run/resume)"))
    monkeypatch.setattr(cluster.local, "up", shut("cluster.local.up"))
    monkeypatch.setattr(cluster.jobs, "submit", shut("cluster.jobs.submit"))
    monkeypatch.setattr(os, "execv", shut("os.execv (ui)"))
    return workspace


def check_one_line(result: Any, expect: str) -> None:
    """Exit 2, one `error:` line on stderr holding `expect`, nothing on stdout, no traceback."""
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}\n{output[-3000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    assert len(lines[0]) <= MAX_MESSAGE + 100, f"{len(lines[0])} characters"
    assert expect in lines[0], lines[0]
    assert not result.stdout.strip(), result.stdout


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, in_workspace) -> None:
    root = in_workspace["root"]
    folder = root / "in" / case.id
    folder.mkdir()
    args = case.make(folder)
    before = listing(root)
    result = CliRunner().invoke(app, args)
    after = listing(root)
    check_one_line(result, case.expect)
    assert after == before, {"new or changed": sorted(set(after.items()) - set(before.items()))[:10],
                             "gone": sorted(set(before) - set(after))[:10]}
    assert not list(folder.rglob("MARKER")), "a file's payload ran"


def test_table_is_large() -> None:
    assert len(CASES) >= 120
    assert len({c.id for c in CASES}) == len(CASES)


# Real processes: the exit status and stderr a user sees (each starts Python: a handful only).
PROCESS_CASES = {
    "server-unreachable": (["status", "--tracking-uri", "http://127.0.0.1:9"], "is not reachable"),
    "brackets-verbatim": (["best", SWEEP, "--pareto"], "`sweep.objectives: [accuracy, params]`"),
    "usage-error": (["run", "{in}/spec.yaml", "--num-trials", "0"], "--num-trials"),
    "pull-users-folder": (["pull", SWEEP, "--to", "{in}"], "spec.yaml"),
}


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_real_process(case_id: str, workspace) -> None:
    args, expect = PROCESS_CASES[case_id]
    folder = workspace["root"] / "in" / f"process-{case_id}"
    folder.mkdir()
    (folder / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    before = listing(workspace["root"])
    started = time.monotonic()
    done = kdsweep(*[a.replace("{in}", str(folder)) for a in args], cwd=workspace["work"], timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert time.monotonic() - started < 60  # no minutes of retries
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert listing(workspace["root"]) == before


def test_help_prints_brackets(workspace) -> None:
    """Help is plain text: every `[default: ...]` and bracketed example survives."""
    for command in [[], ["run"], ["resume"], ["status"], ["best"], ["pull"], ["promote"], ["ui"], ["submit"],
                    ["cluster"], ["cluster", "up"], ["cluster", "down"], ["cluster", "status"]]:
        result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        if command not in ([], ["cluster"], ["resume"], ["promote"], ["best"]):
            assert "[default: " in result.output, command
    best = " ".join(CliRunner().invoke(app, ["best", "--help"], terminal_width=200).output.split())
    assert "sweep.objectives: [accuracy, params]" in best
    assert "[default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db]" in best


def test_pull_twice_then_refuses_users_files(workspace, tmp_path, monkeypatch) -> None:
    """A pull may replace what an earlier pull wrote, never a user's file; --force overrides."""
    monkeypatch.chdir(workspace["work"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    for _ in range(2):
        result = CliRunner().invoke(app, ["pull", SWEEP, "--to", str(out)])
        assert result.exit_code == 0, result.output
    (out / "student.json").write_text("my notes")
    result = CliRunner().invoke(app, ["pull", SWEEP, "--to", str(out)])
    assert result.exit_code == 2 and "student.json" in result.stderr
    assert (out / "student.json").read_text() == "my notes"
    assert CliRunner().invoke(app, ["pull", SWEEP, "--to", str(out), "--force"]).exit_code == 0
    assert (out / "student.json").read_text() != "my notes"


def test_workspace_unchanged(workspace) -> None:
    """After the whole table: the finished sweep's files (store, artifacts, stages, export) and its
    MLflow rows are exactly as they were."""
    assert digest(workspace["work"]) == workspace["digest"]
    assert registry_rows(workspace["uri"]) == workspace["rows"]
