"""The one software version, read from the installed package's metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    try:
        return version("alliance")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+source"


#: This installation's version, as sites and the coordinator report it to each other.
VERSION = _installed_version()
