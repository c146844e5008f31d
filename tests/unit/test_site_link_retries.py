"""The site link against a real grpc.aio coordinator on loopback: wording and backoff.

A refusal that cannot change until a config changes (a certificate issued to another site, a
different dictionary, PERMISSION_DENIED) is logged once at ERROR with what to do, and retried
every few minutes, not every second. A site that never got through says it cannot reach the
coordinator; "lost the link" is only for a link that was up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest

from coordinator import pki
from coordinator.link import SiteLinkService, SiteRegistry
from protocol.config import SiteConfig
from protocol.wire import alliance_pb2_grpc as pb_grpc
from simulations.heart import DICTIONARY_PATH, heart_dictionary
from site_node import link as site_link
from site_node.harmonize import conform
from site_node.link import SiteLink
from site_node.runtime import SiteRuntime

PERMANENT = "this will not change until the site's config (or the coordinator's) changes"


class RecordingLink(SiteLink):
    """A SiteLink whose waits between attempts are recorded instead of slept."""

    def __init__(self, *args: Any, pauses: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delays: list[float] = []
        self.wanted = pauses

    async def _pause(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= self.wanted:
            self.stop()
        await asyncio.sleep(0)


def runtime(tmp_path: Path, name: str = "va", tls: dict[str, str] | None = None) -> SiteRuntime:
    config = SiteConfig.model_validate(
        {
            "name": name,
            "coordinator": "127.0.0.1:1",
            "dictionary": str(DICTIONARY_PATH),
            "data": {"path": str(tmp_path / "unused.csv")},
            "state_dir": str(tmp_path / "state"),
            "reconnect_max_seconds": 30,
            **({"tls": tls} if tls else {"insecure": True}),
        }
    )
    dictionary = heart_dictionary()
    frame = pd.DataFrame({"age": [50.0, 61.0, 47.0], "sex": [1, 0, 1]})
    data, report = conform(frame, dictionary)
    return SiteRuntime(config, dictionary, data, report)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_server(
    servicer: pb_grpc.SiteLinkServicer, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_SiteLinkServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


async def run_link(link: SiteLink, timeout: float) -> None:
    try:
        await asyncio.wait_for(link.run(), timeout)
    except TimeoutError:
        link.stop()
        raise


def site_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "alliance.site"]


def dictionary_refusal(tmp_path: Path) -> tuple[SiteRuntime, Callable[[], Any]]:
    """A coordinator whose dictionary differs from the site's (no TLS needed)."""
    rt = runtime(tmp_path)
    registry = SiteRegistry(None, "0" * 64)
    return rt, lambda: start_server(SiteLinkService(registry, "coordinator", False))


def name_refusal(tmp_path: Path) -> tuple[SiteRuntime, Callable[[], Any]]:
    """Site va dialling with the certificate issued to cleveland (mutual TLS)."""
    folder = tmp_path / "pki"
    pki.init_ca(folder, "Cardio Alliance")
    pki.issue_coordinator(folder, ["127.0.0.1"])
    pki.issue_site(folder, "cleveland")
    tls = {
        "ca": str(folder / "ca.pem"),
        "cert": str(folder / "sites" / "cleveland.pem"),
        "key": str(folder / "sites" / "cleveland.key"),
    }
    rt = runtime(tmp_path, "va", tls)
    registry = SiteRegistry(None, heart_dictionary().digest())
    credentials = grpc.ssl_server_credentials(
        [((folder / "coordinator.key").read_bytes(), (folder / "coordinator.pem").read_bytes())],
        root_certificates=(folder / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    return rt, lambda: start_server(SiteLinkService(registry, "coordinator", True), credentials)


class Suspending(pb_grpc.SiteLinkServicer):
    """A coordinator that answers every stream with PERMISSION_DENIED."""

    def __init__(self) -> None:
        self.calls = 0

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.calls += 1
        # Read the Hello first, as a real server does: aborting before it arrives races the
        # site's write, which then fails with INTERNAL instead of the refusal.
        async for _hello in request_iterator:
            break
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "site va is suspended")
        yield None  # pragma: no cover (abort raises)


def denied(tmp_path: Path) -> tuple[SiteRuntime, Callable[[], Any]]:
    return runtime(tmp_path), lambda: start_server(Suspending())


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (dictionary_refusal, "the site's data dictionary differs from the alliance's"),
        (name_refusal, "this certificate belongs to site 'cleveland', but the stream says"),
        (denied, "site va is suspended"),
    ],
    ids=["dictionary", "certificate-name", "permission-denied"],
)
def test_a_permanent_refusal_is_logged_once_and_retried_every_few_minutes(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    setup: Callable[[Path], tuple[SiteRuntime, Callable[[], Any]]],
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    rt, make_server = setup(tmp_path)

    async def scenario() -> tuple[RecordingLink, int]:
        server, port = await make_server()
        rt.config = rt.config.model_copy(update={"coordinator": f"127.0.0.1:{port}"})
        link = RecordingLink(rt.config, rt, pauses=6)
        try:
            await run_link(link, timeout=8.0)
        except TimeoutError:
            pass  # the old link never pauses through `_pause`; judge what it logged
        finally:
            await server.stop(None)
        return link, port

    try:
        link, port = asyncio.run(scenario())
        refusals_audited = [e for e in rt.store.audit_entries() if e.action == "link_refused"]
    finally:
        rt.close()
    errors = [r for r in site_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert f"the coordinator at 127.0.0.1:{port} refused this site: " in message
    assert reason in message and PERMANENT in message
    # Six real attempts reached the coordinator; the waits between them grow to minutes.
    assert len(link.delays) == 6
    assert all(15 <= d <= 300 for d in link.delays), link.delays
    assert link.delays[-1] >= 150 and link.delays[0] <= 30, link.delays
    later = [r for r in site_records(caplog) if "still refuses this site" in r.getMessage()]
    assert len(later) == 5 and all(r.levelno <= logging.INFO for r in later)
    assert not [r for r in site_records(caplog) if "lost the link" in r.getMessage()]
    assert len(refusals_audited) == 1  # the audit log records the refusal, not each retry


def test_a_site_that_never_connected_cannot_reach_the_coordinator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rt = runtime(tmp_path)
    port = free_port()  # nobody listens here
    rt.config = rt.config.model_copy(update={"coordinator": f"127.0.0.1:{port}"})
    link = RecordingLink(rt.config, rt, pauses=2)
    try:
        asyncio.run(run_link(link, timeout=10.0))
    except TimeoutError:
        pass  # judge what it logged
    finally:
        rt.close()
    messages = [r.getMessage() for r in site_records(caplog)]
    failures = [m for m in messages if m.startswith(("cannot reach", "lost the link"))]
    assert failures, messages
    for text in failures:
        assert text.startswith(f"cannot reach the coordinator at 127.0.0.1:{port} ("), text
    assert len(link.delays) == 2 and link.delays[0] <= 1.0  # retried soon


def test_lost_the_link_only_after_a_successful_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rt = runtime(tmp_path)
    registry = SiteRegistry(None, heart_dictionary().digest())

    async def scenario() -> int:
        server, port = await start_server(SiteLinkService(registry, "coordinator", False))
        rt.config = rt.config.model_copy(update={"coordinator": f"127.0.0.1:{port}"})
        link = RecordingLink(rt.config, rt, pauses=2)
        runner = asyncio.create_task(run_link(link, timeout=15.0))
        await asyncio.wait_for(link.connected.wait(), 10)
        await server.stop(None)  # the coordinator goes away under a connected site
        with contextlib.suppress(TimeoutError):  # judge what it logged
            await runner
        return port

    try:
        port = asyncio.run(scenario())
    finally:
        rt.close()
    messages = [r.getMessage() for r in site_records(caplog)]
    down = [m for m in messages if m.startswith(("lost the link", "cannot reach"))]
    assert down, messages
    assert down[0].startswith(f"lost the link to the coordinator at 127.0.0.1:{port}"), down
    assert all(m.startswith(f"cannot reach the coordinator at 127.0.0.1:{port}") for m in down[1:])


def test_backoff_arithmetic() -> None:
    top: Callable[[float, float], float] = lambda low, high: high  # noqa: E731
    bottom: Callable[[float, float], float] = lambda low, high: low  # noqa: E731
    assert [site_link.refused_delay(n, top) for n in range(1, 8)] == [
        30,
        60,
        120,
        240,
        300,
        300,
        300,
    ]
    assert site_link.refused_delay(1, bottom) == 15
    assert [site_link.reconnect_delay(n, 30, top) for n in range(1, 8)] == [
        1,
        2,
        4,
        8,
        16,
        30,
        30,
    ]
    assert site_link.reconnect_delay(3, 30, bottom) == pytest.approx(0.4)
