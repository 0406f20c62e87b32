"""Distillers, one file per method. Importing this package registers every method."""

from kd_core.distillers import ce, kd  # noqa: F401  (registers the methods)
from kd_core.distillers import dgkd, dml, simkd, sokd, takd  # noqa: F401
from kd_core.distillers.base import Distiller, MethodParams
from kd_core.distillers.registry import DISTILLERS

__all__ = ["DISTILLERS", "Distiller", "MethodParams"]
