"""The UCI Heart Disease data of four hospitals, shipped with the project (CC BY 4.0).

Source: UCI Machine Learning Repository, Heart Disease, DOI 10.24432/C52P4X. Principal
investigators: Andras Janosi (Hungarian Institute of Cardiology, Budapest), William Steinbrunn
(University Hospital, Zurich), Matthias Pfisterer (University Hospital, Basel), Robert Detrano
(V.A. Medical Center, Long Beach, and Cleveland Clinic Foundation). Files are unedited.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from protocol.config import DataDictionary, DataSource, load_yaml
from site_node.harmonize import conform

DATA_DIR = Path(__file__).parent / "data" / "uci_heart"
DICTIONARY_PATH = Path(__file__).parent / "configs" / "heart_dictionary.yaml"
COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
#: site name -> file, in the order of the dataset's documentation.
SITES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
DERIVE = {"disease": "num > 0"}


def heart_dictionary() -> DataDictionary:
    """The demo's data dictionary."""
    return load_yaml(DICTIONARY_PATH, DataDictionary)


def read_raw(site: str) -> pd.DataFrame:
    """One hospital's file as shipped (``?`` read as missing)."""
    return pd.read_csv(DATA_DIR / SITES[site], header=None, names=COLUMNS, na_values=["?"])


def heart_sites() -> dict[str, pd.DataFrame]:
    """Each hospital's records conformed to the dictionary exactly as a site node does it:
    out-of-range values (``chol == 0`` at Switzerland and VA) become missing."""
    dictionary = heart_dictionary()
    return {site: conform(read_raw(site), dictionary, derive=DERIVE)[0] for site in SITES}


def heart_source(site: str) -> DataSource:
    """How a site node reads one hospital's shipped file (no header, ``?`` missing)."""
    return DataSource(
        path=DATA_DIR / SITES[site],
        header=False,
        column_names=COLUMNS,
        na_values=["?"],
        derive=DERIVE,
    )
