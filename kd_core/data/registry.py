"""The dataset registry: name -> factory(seed, val_fraction, test_fraction, **args) -> Dataset."""

from __future__ import annotations

from kd_core.registry import Registry

DATASETS: Registry = Registry("dataset")
