"""Fixtures that start real coordinator and site processes on loopback (mutual TLS)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from protocol.config import DataDictionary, StudyConfig
from simulations.federation import LocalFederation, SiteSpec
from simulations.heart import SITES, heart_dictionary, heart_source

pytestmark = pytest.mark.system

#: People besides the federation's lead and named researcher, for the access-control tests:
#: a researcher no study names, the site admin of an invited site and one of another site.
OUTSIDER = {"token": "outsider-researcher-token", "user": "outsider", "role": "researcher"}
ADMIN_INVITED = {
    "token": "cleveland-site-admin-token",
    "user": "it.cleveland",
    "role": "site_admin",
    "site": "cleveland",
}
ADMIN_OTHER = {
    "token": "elsewhere-site-admin-token",
    "user": "it.elsewhere",
    "role": "site_admin",
    "site": "elsewhere",
}


def heart_federation(
    tmp: Path, mode: str, budget: float = 3.0, epsilon: float = 0.5, **kwargs: object
) -> LocalFederation:
    """Four heart hospitals whose policies approve study s1 in ``mode`` with ``budget`` and at
    most ``epsilon`` per request."""
    sites = [
        SiteSpec(name, heart_source(name), mode=mode, budget=budget, epsilon_per_request=epsilon)
        for name in SITES
    ]
    return LocalFederation(sites, heart_dictionary(), tmp, **kwargs)  # type: ignore[arg-type]


def study(
    mode: str, study_id: str = "s1", epsilon: float = 0.5, budget: float = 3.0
) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "id": study_id,
            "title": f"system test ({mode})",
            "privacy": {"mode": mode, "epsilon_per_request": epsilon, "budget": budget},
        }
    )


@contextmanager
def running_federation(
    sites: list[SiteSpec], dictionary: DataDictionary, root: Path, terms: StudyConfig
) -> Iterator[LocalFederation]:
    """Start a federation of ``sites`` sharing ``dictionary`` under ``root``, approving study
    ``terms``; stop it on leaving the block.

    Args:
        sites: The site nodes to run.
        dictionary: The data dictionary every site conforms to.
        root: The folder for the federation's files (PKI, configs, logs).
        terms: The study the coordinator and the sites' policies approve.

    Yields:
        The running federation.
    """
    federation = LocalFederation(sites, dictionary, root)
    try:
        federation.start(terms)
        yield federation
    finally:
        federation.stop()


@pytest.fixture(scope="module")
def off_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Four heart hospitals whose policies name mode `off` for study s1."""
    federation = heart_federation(
        tmp_path_factory.mktemp("off"),
        "off",
        extra_tokens=[OUTSIDER, ADMIN_INVITED, ADMIN_OTHER],
    )
    try:
        federation.start(study("off"))
        yield federation
    finally:
        federation.stop()
