"""Distillers, one file per method. Importing this package registers every method: each
module of this folder is imported, so a new method is its own file and nothing else."""

import importlib
import pkgutil

from kd_core.distillers.base import START, ContractError, Distiller, MethodParams, TrainingPosition
from kd_core.distillers.registry import DISTILLERS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers its method

__all__ = ["DISTILLERS", "START", "ContractError", "Distiller", "MethodParams", "TrainingPosition"]
