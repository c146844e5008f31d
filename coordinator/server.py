"""``alliance coordinator serve``: the gRPC site link and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import signal
import socket
from pathlib import Path

import grpc
import uvicorn

from coordinator.api import create_app
from coordinator.grpc_log import relay_grpc_stderr
from coordinator.link import SiteLinkService, SiteRegistry
from coordinator.pki import RevocationList, check_crl
from coordinator.scheduler import Scheduler
from coordinator.store import Store
from coordinator.tokens import (
    LiveTokenBook,
    example_token_problems,
    first_start,
    read_tokens,
    tokens_file,
)
from protocol.config import CoordinatorConfig, DataDictionary, load_yaml
from protocol.errors import ConfigError
from protocol.signing import SigningKey
from protocol.tlsfiles import check_tls_files
from protocol.wire import alliance_pb2_grpc as pb_grpc

log = logging.getLogger("alliance.coordinator")

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def _split(address: str, field: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{field}: {address!r} is not host:port (e.g. 127.0.0.1:50051)")
    return host, int(port)


def server_credentials(config: CoordinatorConfig) -> grpc.ServerCredentials | None:
    """Mutual TLS: the client must present a certificate issued by the alliance CA."""
    if config.tls is None:
        return None
    try:
        return grpc.ssl_server_credentials(
            [(config.tls.key.read_bytes(), config.tls.cert.read_bytes())],
            root_certificates=config.tls.ca.read_bytes(),
            require_client_auth=True,
        )
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None


def startup_problems(config: CoordinatorConfig, source: str) -> list[str]:
    """What stops the coordinator from starting: TLS files, example tokens (one line each)."""
    problems = []
    if config.tls is not None:
        problems += check_tls_files(config.tls, "coordinator", config.name).problems
        if config.crl is not None:
            problems += check_crl(config.crl, config.tls.ca)
    elif config.crl is not None:
        problems.append("crl: a revocation list needs tls (it names certificates)")
    problems += example_token_problems(config.tokens, source, source)
    path = tokens_file(config)
    problems += example_token_problems(list(read_tokens(path)), str(path), source, in_file=True)
    return problems


# The coordinator's Ed25519 key (in its state folder): it signs every task it sends.
SIGNING_KEY_FILE = "coordinator_signing_key.pem"


async def serve(
    config: CoordinatorConfig,
    ready_file: Path | None = None,
    relay_stderr: bool = True,
    source: str = "coordinator.yaml",
) -> None:
    """Run until SIGINT or SIGTERM; gRPC core's handshake refusals are logged in plain words.

    Raises:
        ConfigError: before anything is created, one line per problem with the TLS files or
            the tokens (``source`` names the config file in the message).
    """
    problems = startup_problems(config, source)
    if problems:
        raise ConfigError("\n".join(problems))
    dictionary = load_yaml(config.dictionary, DataDictionary)
    # Analyses import scipy.stats lazily (site nodes never need it); the coordinator's combine
    # halves do, so pay the import at start rather than in the first request.
    importlib.import_module("scipy.stats")
    store = Store(config.store)
    signing_key = SigningKey.load_or_create(config.state_dir / SIGNING_KEY_FILE)
    registry = SiteRegistry(store, dictionary.digest(), signing_key)
    scheduler = Scheduler(registry, dictionary, config.task_timeout_seconds)
    revocations = (
        RevocationList(config.crl, config.tls.ca)
        if config.crl is not None and config.tls is not None
        else None
    )
    service = SiteLinkService(
        registry, config.name, require_tls_identity=config.tls is not None, revocations=revocations
    )

    if relay_stderr:
        relay_grpc_stderr()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_SiteLinkServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    host, port = _split(config.site_link, "site_link")
    credentials = server_credentials(config)
    if credentials is None:
        log.warning(
            "INSECURE: the site link has no TLS and no site identity; use this only "
            "on loopback for experiments"
        )
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise ConfigError(f"site_link: cannot listen on {config.site_link} (port in use?)")
    await server.start()

    http_host, http_port = _split(config.http, "http")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: no ~40 ms Nagle/delayed-ACK stall on keep-alive.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((http_host, http_port))
    except OSError as exc:
        await server.stop(None)
        raise ConfigError(f"http: cannot listen on {config.http} ({exc.strerror})") from None
    http_bound = sock.getsockname()[1]
    created = first_start(config)
    if created is not None:
        log.warning(
            "no API tokens yet: created a lead token for person 'lead' in %s (readable by this "
            "user only; tokens.yaml keeps only its digest): read it, then delete that file; "
            "create more with `alliance token create`",
            created,
        )
    tokens = LiveTokenBook(config.tokens, tokens_file(config))
    app = create_app(store, registry, scheduler, tokens, config.max_request_bytes)
    # h11 and no websockets, whatever else is installed: flwr brings uvicorn[standard]
    # (httptools, websockets), which uvicorn would otherwise pick up on its own.
    web = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", http="h11", ws="none"
        )
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    web_task = asyncio.create_task(web.serve(sockets=[sock]))
    store.audit(
        "coordinator_started",
        {
            "site_link": f"{host}:{bound}",
            "http": f"{http_host}:{http_bound}",
            "tls": credentials is not None,
        },
    )
    log.info(
        "%s listening: sites dial %s:%d (%s); people use http://%s:%d",
        "coordinator" if config.name == "coordinator" else f"coordinator {config.name}",
        host,
        bound,
        "mutual TLS" if credentials else "INSECURE",
        http_host,
        http_bound,
    )
    if ready_file is not None:
        ready_file.write_text(
            json.dumps({"site_link": f"{host}:{bound}", "http": f"http://{http_host}:{http_bound}"})
        )
    # uvicorn captures SIGINT/SIGTERM while it serves and stops itself; either way, stop all.
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, web_task}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    log.info("coordinator shutting down")
    web.should_exit = True
    await server.stop(grace=2)
    await web_task
    store.audit("coordinator_stopped", {})
    store.close()
