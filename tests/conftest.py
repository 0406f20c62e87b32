from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from kd_core.data import DATASETS, Dataset


@pytest.fixture(scope="session")
def digits_sweep(tmp_path_factory) -> dict[str, Any]:
    """One small real sweep (tests/sweep_cli.py), shared by the e2e and browser tests."""
    from tests.sweep_cli import run_digits_sweep

    return run_digits_sweep(tmp_path_factory.mktemp("digits_sweep"))


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return DATASETS.get("digits")()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


BASE_SPEC: dict[str, Any] = {
    "name": "unit",
    "teacher": {"arch": {"name": "convnet", "args": {"width": 8, "depth": 1}},
                "recipe": {"name": "digits", "epochs": 2}},
    "student": {"arch": {"name": "convnet", "args": {"width": 4, "depth": 1}}},
    "method": {"name": "kd", "params": {"T": 4.0}},
    "recipe": {"name": "digits", "epochs": 3},
    "search": {
        "method.T": {"low": 1.0, "high": 10.0},
        "method.kl_reduction": {"choices": ["batchmean", "mean"]},
        "recipe.lr": {"low": 0.01, "high": 0.2, "log": True},
    },
}


@pytest.fixture
def spec_dict() -> dict[str, Any]:
    return copy.deepcopy(BASE_SPEC)
