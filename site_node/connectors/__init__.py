"""Connectors: read a hospital's records into a DataFrame."""

from __future__ import annotations

import pandas as pd

from protocol.config import DataSource
from site_node.connectors.csv import read_csv


def load(source: DataSource) -> pd.DataFrame:
    """Read the records a site's ``data`` section describes."""
    if source.connector == "csv":
        return read_csv(source)
    raise NotImplementedError(source.connector)  # the config model admits csv only
