"""Distillers, one file per method. Importing this package registers every method."""

from kd_core.distillers import ce, dgkd, dml, kd, lwkd, sftn, simkd, sokd, takd, tfkd  # noqa: F401  (registers)
from kd_core.distillers.base import START, ContractError, Distiller, MethodParams, TrainingPosition
from kd_core.distillers.registry import DISTILLERS

__all__ = ["DISTILLERS", "START", "ContractError", "Distiller", "MethodParams", "TrainingPosition"]
