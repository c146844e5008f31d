"""Reference data split into sites, as the reference tests use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from analyses.testing import federate
from protocol.config import DataDictionary


@dataclass(frozen=True)
class Split:
    """A dataset split into sites: its dictionary, each site's rows conformed as a site node
    conforms them, and those rows pooled with a ``site`` column (the reference peers' input)."""

    dictionary: DataDictionary
    frames: dict[str, pd.DataFrame]
    pooled: pd.DataFrame

    @classmethod
    def of(cls, frames: dict[str, pd.DataFrame], dictionary: DataDictionary) -> Split:
        """The split of ``frames``, pooled in site order."""
        pooled = pd.concat([f.assign(site=s) for s, f in frames.items()], ignore_index=True)
        return cls(dictionary, frames, pooled)

    def federate(self, name: str, params: dict[str, Any], mode: str = "off") -> Any:
        """Analysis ``name`` over the sites, in process (``analyses.testing.federate``)."""
        return federate(name, self.frames, params, self.dictionary, mode=mode)
