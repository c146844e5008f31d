"""The site's end of the site link: dial out, say hello, answer tasks, and never give up.

The site only makes outbound connections. After a fault it reconnects with exponential backoff
and full jitter (capped by ``reconnect_max_seconds``). A refusal that cannot change until a
config changes (a certificate issued to another site, another dictionary, PERMISSION_DENIED) is
logged once at ERROR and retried every few minutes. Every change of state is one log line in
plain words: "cannot reach" before the link was ever up, "lost the link" after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
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
#: After a permanent refusal: the first retry within this many seconds, doubling up to the cap.
#: how often a connected site looks for decisions its admin made in another process
DECISION_POLL_SECONDS = 0.5
REFUSED_FIRST_SECONDS = 30.0
REFUSED_MAX_SECONDS = 300.0
PERMANENT = "this will not change until the site's config (or the coordinator's) changes"
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
Uniform = Callable[[float, float], float]


def reconnect_delay(attempt: int, cap: float, uniform: Uniform = random.uniform) -> float:
    """Seconds before attempt ``attempt + 1`` after a fault: full jitter below 0.5·2^attempt.

    Full jitter keeps sites that lost the same coordinator from stampeding back together.
    """
    top = min(cap, 0.5 * 2**attempt)
    return uniform(0.1 * top, top)


def refused_delay(refusals: int, uniform: Uniform = random.uniform) -> float:
    """Seconds before retrying after the ``refusals``-th permanent refusal in a row (>= 1)."""
    top = min(REFUSED_MAX_SECONDS, REFUSED_FIRST_SECONDS * 2 ** (refusals - 1))
    return uniform(0.5 * top, top)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class LinkRefused(Exception):
    """The coordinator refused this site; retrying changes nothing until a config changes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


def explain_rpc_error(
    error: grpc.aio.AioRpcError, target: str, tls: bool = True, was_connected: bool = False
) -> str:
    """One line a hospital IT admin can act on, naming the coordinator's address.

    ``was_connected``: the link was up in this attempt ("lost the link"); otherwise the site
    never got through ("cannot reach").
    """
    code = error.code()
    details = (error.details() or "").splitlines()[0] if error.details() else ""
    lowered = details.lower()
    if was_connected:
        return f"lost the link to the coordinator at {target} ({details or code.name})"
    prefix = f"cannot reach the coordinator at {target}"
    if code != grpc.StatusCode.UNAVAILABLE:
        return f"{prefix} ({code.name}: {details})"
    if any(word in lowered for word in ("handshake", "ssl", "certificate", "tls")):
        return (
            f"{prefix} (the TLS handshake failed: {details}); check that this site's "
            "certificate was issued by the alliance CA and that tls.ca is the alliance CA "
            "(`alliance site check` tests both)"
        )
    if tls and "socket closed" in lowered:
        # TLS 1.3: a server that rejects our certificate just closes the socket.
        return (
            f"{prefix} (the coordinator closed the connection during the TLS handshake: "
            f"{details}); if this repeats, this site's certificate was probably not issued by "
            "the alliance CA, or is missing (`alliance site check`)"
        )
    if not tls and "socket closed" in lowered:
        return (
            f"{prefix} (the coordinator closed the connection: {details}); it probably requires "
            "mutual TLS: give this site tls (ca, cert, key) instead of insecure: true"
        )
    if "connection refused" in lowered:
        details = "connection refused"
    return (
        f"{prefix} ({details or 'connection refused'}); check that the coordinator is running "
        "and that `coordinator:` in the site config is its address"
    )


class SiteLink:
    """Runs the site link until ``stop()``."""

    def __init__(self, config: SiteConfig, runtime: SiteRuntime) -> None:
        self.config = config
        self.runtime = runtime
        self._stopping = asyncio.Event()
        self._credentials = channel_credentials(config)
        self.connected = asyncio.Event()
        self.tasks_answered = 0
        self._announce = True  # log "connecting" on the first try and after a lost link

    def stop(self) -> None:
        """Ask the link to close after the task in hand."""
        self._stopping.set()

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds between attempts, or until ``stop()``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff and jitter, until stopped."""
        target = self.config.coordinator
        attempt = 0
        refusals = 0
        last_refusal: str | None = None
        while not self._stopping.is_set():
            started = time.monotonic()
            refused: str | None = None
            try:
                await self._session()
            except LinkRefused as exc:
                refused = exc.reason
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    break
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    refused = exc.details() or "permission denied"
                else:
                    log.warning(
                        "%s",
                        explain_rpc_error(
                            exc, target, self._credentials is not None, self.connected.is_set()
                        ),
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the site alive; the next attempt may succeed
                log.exception("the site link failed unexpectedly")
            if self.connected.is_set():
                self._announce = True
                refusals, last_refusal = 0, None
            self.connected.clear()
            if self._stopping.is_set():
                break
            if refused is not None:
                refusals += 1
                delay = refused_delay(refusals)
                if refused != last_refusal:
                    log.error(
                        "the coordinator at %s refused this site: %s; %s (restart this site "
                        "after changing its config). Next try in %s, then every few minutes",
                        target,
                        refused,
                        PERMANENT,
                        _duration(delay),
                    )
                    self.runtime.store.audit("link_refused", {"reason": refused})
                    last_refusal = refused
                else:
                    log.info(
                        "the coordinator at %s still refuses this site (the reason logged "
                        "before); next try in %s",
                        target,
                        _duration(delay),
                    )
            else:
                attempt = 0 if time.monotonic() - started > 30 else attempt + 1
                delay = reconnect_delay(attempt, self.config.reconnect_max_seconds)
                log.info("reconnecting in %.1f s (attempt %d)", delay, attempt + 1)
            await self._pause(delay)
        log.info("site link closed")

    async def _session(self) -> None:
        """One attempt: dial, say Hello, then answer tasks until the stream ends.

        Raises:
            LinkRefused: when the coordinator's Welcome refuses this site.
        """
        target = self.config.coordinator
        log.log(
            logging.INFO if self._announce else logging.DEBUG,
            "connecting to the coordinator at %s%s",
            target,
            "" if self._credentials else " WITHOUT TLS (--insecure)",
        )
        self._announce = False
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
        # Decisions after this point are sent as they are made (the Hello holds the rest). Read
        # before the call starts: a write must follow the call's start at once, or a refused
        # connection shows as a finished call instead of its gRPC error.
        reported = self.runtime.store.last_decision_seq()
        hello = self.runtime.hello()
        async with channel:
            stub = pb_grpc.SiteLinkStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Connect()
            write_lock = asyncio.Lock()
            await call.write(pb.SiteMessage(hello=hello))
            first = await call.read()
            if first is _EOF or not first.HasField("welcome"):
                log.warning("the coordinator closed the link before welcoming this site")
                return
            if not first.welcome.accepted:
                raise LinkRefused(first.welcome.reason or "no reason given")
            key = first.welcome.signing_key
            if key != self.runtime.coordinator_key:
                # Tasks must carry this key's signature; the audit log keeps which key it was.
                await asyncio.to_thread(
                    self.runtime.store.audit,
                    "coordinator_key",
                    {"coordinator": first.welcome.coordinator, "key": key},
                )
                self.runtime.coordinator_key = key
            log.info(
                "connected to %s at %s; waiting for tasks",
                first.welcome.coordinator or "the coordinator",
                target,
            )
            self.connected.set()
            heartbeat = asyncio.create_task(self._heartbeats(call, write_lock))
            decisions = asyncio.create_task(self._report_decisions(call, write_lock, reported))
            stopper = asyncio.create_task(self._stopping.wait())
            # One reader for the whole session, raced once against a stop request (not a new
            # task and wait per message: that cost more than a small task's answer).
            reader = asyncio.create_task(self._read_tasks(call, write_lock, target))
            try:
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()  # the stream ended, or failed: raise what it raised
                    return
                reader.cancel()  # a stored reply is never lost: a resent task id gets it
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                await call.done_writing()
            finally:
                heartbeat.cancel()
                decisions.cancel()
                stopper.cancel()
                reader.cancel()

    async def _read_tasks(
        self, call: grpc.aio.StreamStreamCall[Any, Any], lock: asyncio.Lock, target: str
    ) -> None:
        """Answer tasks as they come, until the coordinator closes the stream."""
        while True:
            message: Any = await call.read()
            if message is _EOF:
                log.warning("lost the link to the coordinator at %s (it closed the stream)", target)
                return
            if message.HasField("task"):
                log.debug(
                    "received task %s (%s, study %s, round %d)",
                    message.task.task_id,
                    message.task.analysis,
                    message.task.study_id,
                    message.task.round,
                )
                await self._answer(call, lock, message.task)
            elif message.HasField("script_offer"):
                await asyncio.to_thread(self.runtime.receive_offer, message.script_offer)
            elif message.HasField("study_notice"):
                await asyncio.to_thread(self.runtime.receive_notice, message.study_notice)
            elif message.HasField("audit_query"):
                answer = await asyncio.to_thread(self.runtime.audit_answer, message.audit_query)
                async with lock:
                    await call.write(answer)

    async def _answer(
        self, call: grpc.aio.StreamStreamCall[Any, Any], lock: asyncio.Lock, task: pb.Task
    ) -> None:
        if self.runtime.answers_inline:
            # Small data: the task takes about a millisecond, less than a thread hop costs.
            outcome = self.runtime.handle(task)
        else:  # large data: keep the link (heartbeats, stop requests) responsive meanwhile
            outcome = await asyncio.to_thread(self.runtime.handle, task)
        if outcome.status == "refused":
            log.info(
                "refused task %s (request %s, %s, study %s, %s): %s",
                task.task_id,
                task.request_id or "-",
                task.analysis,
                task.study_id,
                outcome.message.refusal.code,
                outcome.reason,
            )
        else:
            log.info(
                "answered task %s (request %s, %s, study %s)%s",
                task.task_id,
                task.request_id or "-",
                task.analysis,
                task.study_id,
                " from the stored reply" if outcome.status == "replayed" else "",
            )
        async with lock:
            await call.write(outcome.message)
        self.tasks_answered += 1

    async def _report_decisions(
        self, call: grpc.aio.StreamStreamCall[Any, Any], lock: asyncio.Lock, after: int
    ) -> None:
        """Send each decision the site admin makes (`alliance site approve | refuse`, another
        process) to the coordinator as it lands in the store."""
        while True:
            await asyncio.sleep(DECISION_POLL_SECONDS)
            for seq, _, decision in await asyncio.to_thread(self.runtime.store.decisions, after):
                async with lock:
                    await call.write(pb.SiteMessage(study_decision=decision))
                log.info(
                    "reported the decision on study %s (%s, version %d) to the coordinator",
                    decision.study_id,
                    decision.decision,
                    decision.version,
                )
                after = seq

    async def _heartbeats(
        self, call: grpc.aio.StreamStreamCall[Any, Any], lock: asyncio.Lock
    ) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            async with lock:
                await call.write(
                    pb.SiteMessage(heartbeat=pb.Heartbeat(sent_unix_ms=int(time.time() * 1000)))
                )
