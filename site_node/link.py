"""The site's end of the site link: dial out, say hello, answer tasks, and never give up.

The site only makes outbound connections. After any fault it reconnects with exponential
backoff and full jitter (capped by ``reconnect_max_seconds``), and it logs every change of state
in plain words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import grpc

from protocol.config import SiteConfig
from protocol.errors import ConfigError
from protocol.wire import alliance_pb2 as pb
from protocol.wire import alliance_pb2_grpc as pb_grpc
from site_node.runtime import SiteRuntime

log = logging.getLogger("alliance.site")
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # absent from the stubs

#: Sites with at most this many rows answer tasks on the event loop itself.
INLINE_ROWS = 200_000
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def channel_credentials(config: SiteConfig) -> grpc.ChannelCredentials | None:
    """Mutual-TLS credentials from the site's files, or None with ``insecure``."""
    if config.tls is None:
        return None
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=config.tls.ca.read_bytes(),
            private_key=config.tls.key.read_bytes(),
            certificate_chain=config.tls.cert.read_bytes(),
        )
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None


def explain_rpc_error(error: grpc.aio.AioRpcError, tls: bool = True) -> str:
    """One line a hospital IT admin can act on."""
    code = error.code()
    details = (error.details() or "").splitlines()[0] if error.details() else ""
    lowered = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if (
            "handshake" in lowered
            or "ssl" in lowered
            or "certificate" in lowered
            or "tls" in lowered
        ):
            return (
                f"the TLS handshake failed ({details}); check that this site's certificate "
                "was issued by the alliance CA and that tls.ca is the alliance CA"
            )
        if tls and "socket closed" in lowered:
            # TLS 1.3: a server that rejects our certificate just closes the socket.
            return (
                f"the coordinator closed the connection during the TLS handshake ({details}); "
                "if this repeats, this site's certificate was probably not issued by the "
                "alliance CA, or is missing"
            )
        if not tls and "socket closed" in lowered:
            return (
                f"the coordinator closed the connection ({details}); it probably requires "
                "mutual TLS: give this site tls (ca, cert, key) instead of insecure: true"
            )
        return f"the coordinator is unreachable ({details or 'connection refused'})"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the coordinator refused this site: {details}"
    return f"{code.name}: {details}"


class SiteLink:
    """Runs the site link until ``stop()``."""

    def __init__(self, config: SiteConfig, runtime: SiteRuntime) -> None:
        self.config = config
        self.runtime = runtime
        self._stopping = asyncio.Event()
        self._credentials = channel_credentials(config)
        self.connected = asyncio.Event()
        self.tasks_answered = 0

    def stop(self) -> None:
        """Ask the link to close after the task in hand."""
        self._stopping.set()

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff and jitter, until stopped."""
        attempt = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self._session()
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    break
                log.warning(
                    "lost the link to the coordinator: %s",
                    explain_rpc_error(exc, self._credentials is not None),
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the site alive; the next attempt may succeed
                log.exception("the site link failed unexpectedly")
            self.connected.clear()
            if self._stopping.is_set():
                break
            attempt = 0 if time.monotonic() - started > 30 else attempt + 1
            cap = min(self.config.reconnect_max_seconds, 0.5 * 2**attempt)
            delay = random.uniform(0.1 * cap, cap)  # full jitter: sites do not stampede back
            log.info("reconnecting in %.1f s (attempt %d)", delay, attempt + 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        log.info("site link closed")

    async def _session(self) -> None:
        target = self.config.coordinator
        log.info(
            "connecting to the coordinator at %s%s",
            target,
            "" if self._credentials else " WITHOUT TLS (--insecure)",
        )
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
        async with channel:
            stub = pb_grpc.SiteLinkStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Connect()
            write_lock = asyncio.Lock()
            await call.write(pb.SiteMessage(hello=self.runtime.hello()))
            first = await call.read()
            if first is _EOF or not first.HasField("welcome"):
                log.warning("the coordinator closed the link before welcoming this site")
                return
            if not first.welcome.accepted:
                log.error("the coordinator refused this site: %s", first.welcome.reason)
                self.runtime.store.audit("link_refused", {"reason": first.welcome.reason})
                return
            log.info("connected to %s; waiting for tasks", first.welcome.coordinator or target)
            self.connected.set()
            heartbeat = asyncio.create_task(self._heartbeats(call, write_lock))
            stopper = asyncio.create_task(self._stopping.wait())
            try:
                while True:
                    reader = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait(
                        {reader, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if stopper in done:
                        reader.cancel()
                        await call.done_writing()
                        return
                    message = reader.result()
                    if message is _EOF:
                        log.warning("the coordinator closed the link")
                        return
                    if message.HasField("task"):
                        await self._answer(call, write_lock, message.task)
            finally:
                heartbeat.cancel()
                stopper.cancel()

    async def _answer(
        self, call: grpc.aio.StreamStreamCall[Any, Any], lock: asyncio.Lock, task: pb.Task
    ) -> None:
        if len(self.runtime.data) <= INLINE_ROWS:
            # Small data: the task takes about a millisecond, less than a thread hop costs.
            outcome = self.runtime.handle(task)
        else:  # large data: keep the link (heartbeats, stop requests) responsive meanwhile
            outcome = await asyncio.to_thread(self.runtime.handle, task)
        if outcome.status == "refused":
            log.info(
                "refused task %s (%s, study %s): %s",
                task.task_id,
                task.analysis,
                task.study_id,
                outcome.reason,
            )
        else:
            log.debug(
                "answered task %s (%s)%s",
                task.task_id,
                task.analysis,
                " from the stored reply" if outcome.status == "replayed" else "",
            )
        async with lock:
            await call.write(outcome.message)
        self.tasks_answered += 1

    async def _heartbeats(
        self, call: grpc.aio.StreamStreamCall[Any, Any], lock: asyncio.Lock
    ) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            async with lock:
                await call.write(
                    pb.SiteMessage(heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000)))
                )
