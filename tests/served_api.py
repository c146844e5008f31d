"""The coordinator's HTTP app on a real uvicorn server on loopback, for the API tests.

The app runs over a real store and an empty site registry (no site is connected: requests that
reach the scheduler fail fast), with one lead token.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from coordinator.api import create_app
from coordinator.auth import TokenBook
from coordinator.link import SiteRegistry
from coordinator.scheduler import Scheduler
from coordinator.store import Store
from coordinator.studies import StudyBook
from protocol.config import APIToken
from simulations.heart import heart_dictionary


def coordinator_app(
    store: Store, lead_token: str, studies: StudyBook | None = None, task_timeout: float = 1.0
) -> FastAPI:
    """The coordinator's app over ``store``, the heart dictionary and an empty registry."""
    dictionary = heart_dictionary()
    registry = SiteRegistry(store, dictionary.digest())
    scheduler = Scheduler(registry, dictionary, task_timeout=task_timeout)
    tokens = TokenBook([APIToken(token=lead_token, user="lead", role="lead")])
    return create_app(store, registry, scheduler, tokens, studies=studies)


@contextmanager
def served_app(
    store: Store,
    lead_token: str,
    studies: StudyBook | None = None,
    task_timeout: float = 1.0,
    log_level: str = "warning",
) -> Iterator[int]:
    """Serve the coordinator's app over ``store`` until the block ends; yield its port."""
    app = coordinator_app(store, lead_token, studies, task_timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    # As coordinator/server.py serves it: h11, no websockets, asyncio's own loop.
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="off", http="h11", ws="none", loop="asyncio"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
