"""One module per architecture family (named by ``moepack.arch.Family.name``), each exposing ``ModelArgs`` and ``Model``."""

from __future__ import annotations

import importlib
from types import ModuleType


def module_for(family: str) -> ModuleType:
    return importlib.import_module(f"moepack.runtime.models.{family}")
