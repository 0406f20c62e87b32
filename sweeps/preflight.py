"""What a sweep checks against the world before Ray starts and before anything is written: the
data loads, every candidate model builds and runs on it, the resources asked for exist, the
MLflow experiment can take runs. The spec alone is checked when it is loaded (`sweeps.spec`).

Every refusal is a `PreflightError` (a SpecError: the command line prints one line naming the
field or path and exits 2); what is legal but suspicious is a one-line warning.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from kd_core.data import Dataset
from kd_core.models import build_model
from sweeps.pipeline import load_dataset
from sweeps.sources import assistant_archs
from sweeps.spec import SpecError, SweepSettings, SweepSpec
from sweeps.spec.coerce import clip
from sweeps.tracking import Tracker

Warn = Callable[[str], None]
MIN_TRAIN_IMAGES = 100  # fewer training images (or fewer than MIN_PER_CLASS per class): a warning
MIN_PER_CLASS = 10
PATH_ARGS = ("root", "train_dir", "val_dir")  # dataset arguments that name files, quoted in errors


class PreflightError(SpecError):
    """The spec cannot run here: its data, a model, the resources or the tracking store say no."""


def print_warning(message: str) -> None:
    """A warning as one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def check_before_start(spec: SweepSpec, address: str | None, warn: Warn = print_warning) -> None:
    """Everything a new or resumed sweep can check before Ray starts: local resources (for a
    local sweep; a cluster's are checked once connected, `check_cluster_resources`), the data
    and every candidate model on it. Raises PreflightError; warns about a tiny training split
    and a student larger than its teacher."""
    if address is None:
        check_local_resources(spec.sweep)
    data = check_data(spec)
    check_split_sizes(data, warn)
    check_models(spec, data, warn)


def local_cpu_count() -> float:
    """The CPUs a local Ray would see (it reads cgroup limits too), else the machine's."""
    try:
        from ray._private.utils import get_num_cpus  # what ray.init counts; no public API for it

        return float(get_num_cpus())
    except (ImportError, AttributeError):
        return float(os.cpu_count() or 1)


def check_local_resources(settings: SweepSettings) -> None:
    """A local sweep's trial fits this machine: otherwise Ray waits forever for a CPU or GPU."""
    cpus = local_cpu_count()
    if settings.cpus_per_trial > cpus:
        raise PreflightError(
            f"sweep.cpus_per_trial: {settings.cpus_per_trial:g} CPUs per trial, but this machine has {cpus:g}: "
            f"no trial could start; set sweep.cpus_per_trial to at most {cpus:g}, or run on a cluster (--address)")
    if settings.gpus_per_trial > 0:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise PreflightError(
                f"sweep.gpus_per_trial: {settings.gpus_per_trial:g} GPU per trial, but this machine has no CUDA "
                "GPU (torch.cuda.is_available() is False); set sweep.gpus_per_trial: 0 to train on the CPU, "
                "or run on a cluster with GPUs (--address)")
        if settings.gpus_per_trial > gpus:
            raise PreflightError(
                f"sweep.gpus_per_trial: {settings.gpus_per_trial:g} GPUs per trial, but this machine has {gpus}: "
                f"set sweep.gpus_per_trial to at most {gpus}")


def check_cluster_resources(settings: SweepSettings) -> None:
    """Each worker's CPUs and GPUs fit on one live node of the Ray cluster this process is
    connected to (a worker runs on one node), and a whole trial's fit the cluster (otherwise it
    would wait forever). Call it right after connecting, before anything is written."""
    import ray  # only here: the other checks run before Ray is imported

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    total = ray.cluster_resources()
    workers = settings.workers_per_trial
    for field, key, asked in (("cpus_per_trial", "CPU", settings.cpus_per_trial),
                              ("gpus_per_trial", "GPU", settings.gpus_per_trial)):
        largest = max((float(node.get(key, 0)) for node in nodes), default=0.0)
        cluster = f"the cluster: {float(total.get(key, 0)):g} {key}s on {len(nodes)} nodes"
        if asked / workers > largest:
            has = f"the largest node of the Ray cluster has {largest:g}" if largest else \
                f"no node of the Ray cluster has {key}s"
            per = f"{asked:g} {key}s per trial" if workers == 1 else \
                f"{asked / workers:g} {key}s per worker ({asked:g} per trial on {workers} workers)"
            raise PreflightError(
                f"sweep.{field}: {per}, but {has} ({cluster}): no trial could start; set sweep.{field} to at "
                f"most {largest * workers:g}, or add nodes with more {key}s")
        if asked > float(total.get(key, 0)):
            raise PreflightError(
                f"sweep.{field}: {asked:g} {key}s per trial ({workers} workers), but {cluster}: no trial could "
                f"start; lower sweep.{field} or sweep.workers_per_trial, or add nodes")


def check_experiment(tracker: Tracker, name: str) -> None:
    """The spec's MLflow experiment is usable: not in MLflow's trash, where no run can be created."""
    experiment = tracker.client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        number = experiment.experiment_id
        uri = tracker.uri if tracker.uri.startswith("sqlite:") else "URI"  # a server URI may hold credentials
        raise PreflightError(
            f"tracking.experiment {clip(repr(name))} is deleted (in MLflow's trash): restore "
            f"it with `mlflow experiments restore --experiment-id {number}` or remove it for good with "
            f"`mlflow gc --backend-store-uri {uri} --experiment-ids {number}` (MLFLOW_TRACKING_URI={uri}), "
            "or set tracking.experiment to another name")


def _data_label(spec: SweepSpec, problem: str = "") -> str:
    """`data (cifar10, root /x)`: the dataset and the files it was told to read (those the
    `problem` does not name already)."""
    paths = [f"{key} {clip(str(spec.data.args[key]))}" for key in PATH_ARGS
             if spec.data.args.get(key) and str(spec.data.args[key]) not in problem]
    return f"data ({', '.join([spec.data.name, *paths])})"


def check_data(spec: SweepSpec) -> Dataset:
    """The spec's dataset, loaded once (the driver keeps it: `load_dataset` caches per process)."""
    try:
        data = load_dataset(spec.data.model_dump())
    except Exception as error:  # whatever the user's files make the loader raise is a data problem
        problem = _first_line(error)
        raise PreflightError(f"{_data_label(spec, problem)}: cannot be loaded: {problem}") from None
    for split in ("train", "val", "test"):
        if len(getattr(data, split)) == 0:
            raise PreflightError(f"{_data_label(spec)}: the {split} split is empty")
    return data


def check_split_sizes(data: Dataset, warn: Warn) -> None:
    """A warning when too few training images are left after the val/test fractions."""
    count = len(data.train)
    per_class = count / max(1, data.num_classes)
    if count < MIN_TRAIN_IMAGES or per_class < MIN_PER_CLASS:
        warn(f"data: only {count} training images ({per_class:.1f} per class) after the val/test fractions; "
             "trial results will be mostly noise (lower data.val_fraction or data.test_fraction, or use more data)")


def candidate_archs(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(field, architecture) of every model a sweep may build: the teacher, the assistants and
    the student at each extreme of its searched arguments."""
    found = [("teacher.arch", spec.teacher.arch.model_dump())] if spec.teacher and spec.teacher.arch else []
    found += [(f"assistants.{i}", arch) for i, arch in enumerate(assistant_archs(spec))]
    student = spec.student.arch.model_dump()
    found.append(("student.arch", student))
    for path, param in spec.search.items():
        if path.startswith("student.args."):
            name = path.removeprefix("student.args.")
            values = param.choices if param.type == "categorical" else [param.low, param.high]
            cast = int if param.type == "int" else (lambda v: v)
            found += [(f"search.{path}", {**student, "args": {**student["args"], name: cast(v)}}) for v in values or []]
    return found


def example_input(data: Dataset) -> torch.Tensor:
    """One validation image as a batch of one, as the models will see it."""
    dataset = getattr(data.val, "dataset", None)
    if dataset is not None:  # a DataLoader split: read one item here, without starting workers
        return dataset[0][0].unsqueeze(0)
    images, _ = next(iter(data.val.batches(1)))
    return images


def check_models(spec: SweepSpec, data: Dataset, warn: Warn) -> None:
    """Every candidate model builds for the data's classes and channels and runs on one of its
    images; a warning when a student has more parameters than the teacher."""
    try:
        example = example_input(data)
    except Exception as error:  # a corrupt image, a loader that fails on its first item
        raise PreflightError(f"{_data_label(spec)}: cannot read an image: {_first_line(error)}") from None
    sizes: dict[str, tuple[str, int]] = {}
    built: dict[str, int] = {}  # parameter counts by architecture: each distinct model is built once
    for field, arch in candidate_archs(spec):
        label = f"{arch['name']}({', '.join(f'{k}={v}' for k, v in sorted(arch.get('args', {}).items()))})"
        key = json.dumps(arch, sort_keys=True, default=str)
        if key not in built:
            try:
                model = build_model(arch["name"], data.num_classes, data.in_channels, arch.get("args", {})).eval()
                with torch.no_grad():
                    model(example)
            except (RuntimeError, ValueError, TypeError, IndexError) as error:
                raise PreflightError(f"{field}: {clip(label)} cannot run on {data.name} images of shape "
                                     f"{tuple(example.shape[1:])}: {_first_line(error)}") from None
            built[key] = sum(p.numel() for p in model.parameters())
        sizes[field] = (label, built[key])
    if "teacher.arch" in sizes:
        teacher, teacher_size = sizes["teacher.arch"]
        students = [(label, size) for field, (label, size) in sizes.items() if "student" in field]
        label, size = max(students, key=lambda s: s[1])
        if size > teacher_size:
            warn(f"student.arch: {clip(label)} has {size:,} parameters, more than the teacher {clip(teacher)} "
                 f"({teacher_size:,}); distilling from a smaller teacher rarely helps")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return clip(lines[0] if lines else type(error).__name__, 1000)
