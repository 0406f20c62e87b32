"""The distiller registry: method name -> Distiller subclass."""

from __future__ import annotations

from kd_core.registry import Registry

DISTILLERS: Registry = Registry("method")
