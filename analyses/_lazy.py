"""Import heavy modules on first use: a site node starts faster (scipy.stats alone takes ~1 s
on a small machine) and only the coordinator's combine half needs them."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A stand-in for a module that imports it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


#: ``scipy.stats``, imported when first used.
stats: Any = LazyModule("scipy.stats")
