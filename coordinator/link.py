"""The coordinator's end of the site link (grpc.aio) and the registry of connected sites.

A task handed to :meth:`SiteRegistry.run_task` stays outstanding until the site answers or the
timeout passes: if the site drops and comes back in time, the same task (same id) is sent again,
and the site answers from its stored reply without charging twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from coordinator.pki import RevocationList
from coordinator.store import Store
from protocol.audit import canonical_json
from protocol.config import StudyConfig
from protocol.errors import AllianceError
from protocol.signing import (
    Receipt,
    SigningKey,
    fingerprint,
    is_hex,
    reply_digest,
    sign_message,
    sign_task,
    task_digest,
)
from protocol.version import VERSION
from protocol.wire import alliance_pb2 as pb
from protocol.wire import alliance_pb2_grpc as pb_grpc

log = logging.getLogger("alliance.coordinator")

#: (site, its signed decision, the key its Hello presented) -> (what is wrong, or None; the
#: study and its new state when the decision changed it)
DecisionHandler = Callable[
    [str, pb.StudyDecision, str], tuple[str | None, tuple[StudyConfig, str] | None]
]


class SiteUnavailable(AllianceError):
    """A site did not answer a task: it is not connected, dropped, or timed out."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class SiteSession:
    """One connected site's stream."""

    name: str
    hello: pb.Hello
    outbox: asyncio.Queue[pb.CoordinatorMessage | None] = field(default_factory=asyncio.Queue)
    connected_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _Outstanding:
    task: pb.Task
    future: asyncio.Future[pb.SiteMessage]


def script_offer(script: dict[str, Any]) -> pb.CoordinatorMessage:
    """The message that brings a submitted script to a site for review."""
    return pb.CoordinatorMessage(
        script_offer=pb.ScriptOffer(
            study_id=script["study_id"], module=script["module"], manifest=script["manifest"]
        )
    )


class SiteRegistry:
    """Connected sites and the tasks waiting for them."""

    def __init__(
        self, store: Store | None, dictionary_digest: str, signing_key: SigningKey | None = None
    ) -> None:
        self.store = store
        self.dictionary_digest = dictionary_digest
        # Signs every task sent (a fresh key when none is given: tests and in-process runs).
        self.signing_key = signing_key or SigningKey.generate()
        # Verified receipts by request id, until the request is stored with them.
        self._receipts: dict[str, list[Receipt]] = {}
        # Audit queries waiting for a site's answer, by query id.
        self._audit_queries: dict[str, asyncio.Future[pb.AuditAnswer]] = {}
        self.sessions: dict[str, SiteSession] = {}
        self.disconnected_at: dict[str, float] = {}
        self._outstanding: dict[str, dict[str, _Outstanding]] = {}
        self.changed = asyncio.Condition()
        # The study book's handler of a site's signed decision (set by the HTTP app): what is
        # wrong with it, and a study whose state it changed.
        self.on_decision: DecisionHandler | None = None

    def connected(self) -> list[str]:
        """Names of the connected sites, sorted."""
        return sorted(self.sessions)

    async def wait_for_sites(self, names: list[str], timeout: float) -> list[str]:
        """Wait until every named site is connected (or the timeout); return the missing."""
        deadline = time.monotonic() + timeout
        async with self.changed:
            while missing := [n for n in names if n not in self.sessions]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return missing
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except TimeoutError:
                    return [n for n in names if n not in self.sessions]
        return []

    async def attach(self, session: SiteSession) -> None:
        """Register a site's new stream, replacing an older one, and resend its open tasks."""
        old = self.sessions.get(session.name)
        if old is not None:
            log.info("site %s reconnected; closing its previous stream", session.name)
            old.outbox.put_nowait(None)
        self.sessions[session.name] = session
        self.disconnected_at.pop(session.name, None)
        for item in self._outstanding.get(session.name, {}).values():
            session.outbox.put_nowait(pb.CoordinatorMessage(task=item.task))
        if self.store is not None:  # scripts its admin may want to review before any task
            for script in await asyncio.to_thread(self.store.offered_scripts, session.name):
                session.outbox.put_nowait(script_offer(script))
            for study, state in await asyncio.to_thread(self._invited, session.name):
                session.outbox.put_nowait(self.notice(study, state))
        async with self.changed:
            self.changed.notify_all()

    async def detach(self, session: SiteSession) -> None:
        """Forget a stream that closed (unless a newer one replaced it)."""
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
            self.disconnected_at[session.name] = time.time()
            async with self.changed:
                self.changed.notify_all()

    def _invited(self, site: str) -> list[tuple[StudyConfig, str]]:
        """Every study past its draft that invites ``site`` (or every site), with its state."""
        assert self.store is not None
        out = []
        for row in self.store.studies():
            found = self.store.study(row["id"])
            state = row["status"]
            if found is None or state == "draft":
                continue
            study = StudyConfig.model_validate(found["config"])
            if not study.sites or site in study.sites:
                out.append((study, state))
        return out

    def notice(self, study: StudyConfig, state: str) -> pb.CoordinatorMessage:
        """A signed notice of a study's current version and state."""
        notice = pb.StudyNotice(
            study_id=study.id,
            version=study.version,
            state=state,
            study_json=canonical_json(study.model_dump(mode="json")),
            sent_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        sign_message(notice, self.signing_key)
        return pb.CoordinatorMessage(study_notice=notice)

    def announce(self, study: StudyConfig, state: str) -> list[str]:
        """Tell the invited, connected sites a study's version and state (the others are told
        when they connect); return those told. A draft is sent nowhere."""
        if state == "draft":
            return []
        message = self.notice(study, state)
        told = []
        for name in study.sites or list(self.sessions):
            session = self.sessions.get(name)
            if session is not None:
                session.outbox.put_nowait(message)
                told.append(name)
        return told

    async def receive_decisions(
        self, site: str, decisions: list[pb.StudyDecision], public_key: str
    ) -> None:
        """Hand a site's signed decisions to the study book; announce a study they activate."""
        if self.on_decision is None:
            return
        for decision in decisions:
            problem, changed = await asyncio.to_thread(self.on_decision, site, decision, public_key)
            if problem is not None:
                log.warning(
                    "discarded site %s's decision on study %s: %s",
                    site,
                    decision.study_id[:64],
                    problem,
                )
                if self.store is not None:
                    await asyncio.to_thread(
                        self.store.audit,
                        "decision_rejected",
                        {"site": site, "study": decision.study_id[:64], "why": problem},
                    )
            elif changed is not None:
                log.info("study %s is %s", changed[0].id, changed[1])
                self.announce(*changed)

    def offer_script(self, sites: list[str], script: dict[str, Any]) -> list[str]:
        """Send a submitted script to the named sites that are connected (the others get it
        when they connect); return those it went to."""
        sent = []
        for name in sites:
            session = self.sessions.get(name)
            if session is not None:
                session.outbox.put_nowait(script_offer(script))
                sent.append(name)
        return sent

    async def ask_audit(self, site: str, study_id: str, timeout: float) -> pb.AuditAnswer:
        """A connected site's audit head and its reply entries of ``study_id``.

        Raises:
            SiteUnavailable: the site is not connected, or did not answer in time.
        """
        session = self.sessions.get(site)
        if session is None:
            raise SiteUnavailable("disconnected", f"site {site} is not connected")
        query_id = uuid.uuid4().hex
        future: asyncio.Future[pb.AuditAnswer] = asyncio.get_running_loop().create_future()
        self._audit_queries[query_id] = future
        session.outbox.put_nowait(
            pb.CoordinatorMessage(audit_query=pb.AuditQuery(query_id=query_id, study_id=study_id))
        )
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise SiteUnavailable(
                "timeout", f"site {site} did not show its audit log within {timeout:g} s"
            ) from None
        finally:
            self._audit_queries.pop(query_id, None)

    def answer_audit(self, answer: pb.AuditAnswer) -> None:
        """Resolve the audit query a site answered."""
        future = self._audit_queries.get(answer.query_id)
        if future is not None and not future.done():
            future.set_result(answer)

    def take_receipts(self, request_id: str) -> list[Receipt]:
        """The verified receipts of a request's replies (handed over once, to be stored)."""
        return self._receipts.pop(request_id, [])

    def _check_receipt(
        self, site: str, site_key: str, task: pb.Task, message: pb.SiteMessage
    ) -> pb.SiteMessage:
        """Keep a reply's receipt when it verifies; otherwise turn the reply into a refusal
        (code ``signature``): an unsigned or forged reply is never used."""
        reply = message.reply
        receipt = Receipt.from_reply(site, site_key, reply)
        problem = None
        if not site_key:
            problem = "the site presented no signing key in its Hello"
        elif reply.request_digest != task_digest(task):
            problem = "it answers a task other than the one sent"
        elif reply_digest(reply.task_id, reply.record) != reply.receipt:
            problem = "its record does not match its digest"
        elif not receipt.valid():
            problem = f"its signature does not verify under the site's key {fingerprint(site_key)}"
        if problem is None:
            self._receipts.setdefault(task.request_id, []).append(receipt)
            return message
        reason = f"the reply of {site} to task {task.task_id} was discarded: {problem}"
        log.warning("%s", reason)
        if self.store is not None:
            self.store.audit("reply_rejected", {"site": site, "task": task.task_id, "why": problem})
        return pb.SiteMessage(
            refusal=pb.Refusal(task_id=task.task_id, code="signature", reason=reason)
        )

    def deliver(self, site: str, task_id: str, message: pb.SiteMessage, site_key: str = "") -> None:
        """Resolve the task a reply or refusal answers (a reply only with a valid receipt,
        signed by ``site_key``, the key the site's stream presented)."""
        item = self._outstanding.get(site, {}).pop(task_id, None)
        if item is None:
            log.debug("site %s answered task %s, which nobody is waiting for", site, task_id)
            return
        task = item.task
        if message.HasField("reply"):
            message = self._check_receipt(site, site_key, task, message)
        # One line per answer: ids, analysis, site and the refusal's code; never a value.
        if message.HasField("refusal"):
            log.info(
                "task %s of request %s (%s, study %s) refused by %s (%s)",
                task_id,
                task.request_id or "-",
                task.analysis,
                task.study_id,
                site,
                message.refusal.code or "no code",
            )
        else:
            log.info(
                "task %s of request %s (%s, study %s) answered by %s%s",
                task_id,
                task.request_id or "-",
                task.analysis,
                task.study_id,
                site,
                " (its stored reply)" if message.reply.replayed else "",
            )
        if not item.future.done():
            item.future.set_result(message)

    async def run_task(self, site: str, task: pb.Task, timeout: float) -> pb.SiteMessage:
        """Send a task to a site and wait for its reply or refusal.

        Raises:
            SiteUnavailable: status ``disconnected`` when the site is not connected at the
                start, ``timeout`` when no answer came in time (naming when it dropped).
        """
        session = self.sessions.get(site)
        if session is None:
            raise SiteUnavailable("disconnected", f"site {site} is not connected")
        sign_task(task, self.signing_key)
        future: asyncio.Future[pb.SiteMessage] = asyncio.get_running_loop().create_future()
        self._outstanding.setdefault(site, {})[task.task_id] = _Outstanding(task, future)
        session.outbox.put_nowait(pb.CoordinatorMessage(task=task))
        log.debug(
            "sent task %s of request %s (%s, round %d) to %s",
            task.task_id,
            task.request_id or "-",
            task.analysis,
            task.round,
            site,
        )
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            log.warning(
                "task %s of request %s (%s) got no answer from %s within %g s",
                task.task_id,
                task.request_id or "-",
                task.analysis,
                site,
                timeout,
            )
            dropped = self.disconnected_at.get(site)
            if site not in self.sessions and dropped is not None:
                when = time.strftime("%H:%M:%S", time.localtime(dropped))
                reason = (
                    f"site {site} disconnected at {when} during the task and did not come "
                    f"back within {timeout:g} s"
                )
                raise SiteUnavailable("disconnected", reason) from None
            raise SiteUnavailable(
                "timeout", f"site {site} did not answer within {timeout:g} s"
            ) from None
        finally:
            self._outstanding.get(site, {}).pop(task.task_id, None)


def peer_common_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The subject CN of the client certificate, when the link uses mutual TLS."""
    values = list(context.auth_context().get("x509_common_name", []))
    return values[0].decode() if values else None


class SiteLinkService(pb_grpc.SiteLinkServicer):
    """The gRPC servicer: one ``Connect`` stream per site."""

    def __init__(
        self,
        registry: SiteRegistry,
        name: str,
        require_tls_identity: bool,
        revocations: RevocationList | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self.require_tls_identity = require_tls_identity
        self.revocations = revocations

    def _check_hello(
        self, hello: pb.Hello, cn: str | None, cert_pem: bytes | None = None
    ) -> str | None:
        if self.require_tls_identity and cn is None:
            return "no client certificate was presented"
        if self.revocations is not None and cert_pem is not None:
            revoked = self.revocations.revoked(cert_pem)
            if revoked is not None:
                return (
                    f"this certificate (site {cn}, serial {revoked.serial:x}) was revoked by the "
                    f"alliance lead on {revoked.revoked:%Y-%m-%d}; ask the lead for a new one"
                )
        if cn is not None and cn != hello.site_id:
            return (
                f"this certificate belongs to site {cn!r}, but the stream says it is "
                f"{hello.site_id!r}"
            )
        if not is_hex(hello.signing_key, 64):
            return (
                "the site presented no valid signing key (an Ed25519 public key, 64 hex "
                "digits): it signs every reply's receipt; upgrade the site node"
            )
        if hello.dictionary_digest != self.registry.dictionary_digest:
            return (
                "the site's data dictionary differs from the alliance's (digest "
                f"{hello.dictionary_digest[:12]} vs {self.registry.dictionary_digest[:12]}); "
                "install the alliance's dictionary at the site"
            )
        return None

    async def Connect(self, request_iterator: Any, context: Any) -> Any:
        """Run one site's stream: Hello, Welcome, then tasks out and replies in."""
        cn = peer_common_name(context)
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if not first.HasField("hello"):
            yield pb.CoordinatorMessage(
                welcome=pb.Welcome(
                    accepted=False, reason="the first message on the site link must be Hello"
                )
            )
            return
        hello = first.hello
        pems = list(context.auth_context().get("x509_pem_cert", []))
        problem = self._check_hello(hello, cn, pems[0] if pems else None)
        if problem:
            log.warning(
                "refused site %s from %s: %s", hello.site_id or "?", context.peer(), problem
            )
            if self.registry.store is not None:
                self.registry.store.audit(
                    "site_refused", {"site": hello.site_id, "cn": cn, "reason": problem}
                )
            yield pb.CoordinatorMessage(
                welcome=pb.Welcome(accepted=False, reason=problem, coordinator=self.name)
            )
            return
        session = SiteSession(hello.site_id, hello)
        # Before the site counts as connected: a study created next sees its approvals.
        await self.registry.receive_decisions(
            hello.site_id, list(hello.decisions), hello.signing_key
        )
        await self.registry.attach(session)
        # Never a count: how many records a site holds is the site's to publish.
        log.info(
            "site %s connected (version %s, analyses: %s)",
            hello.site_id,
            hello.software_version,
            ", ".join(hello.allowed_analyses) or "none",
        )
        if self.registry.store is not None:
            if hello.signing_key:
                await asyncio.to_thread(
                    self.registry.store.register_site_key, hello.site_id, hello.signing_key
                )
            await asyncio.to_thread(
                self.registry.store.site_seen,
                hello.site_id,
                "connected",
                {
                    "version": hello.software_version,
                    "dictionary_digest": hello.dictionary_digest,
                },
            )
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            yield pb.CoordinatorMessage(
                welcome=pb.Welcome(
                    accepted=True,
                    coordinator=self.name,
                    software_version=VERSION,
                    signing_key=self.registry.signing_key.public_hex,
                )
            )
            while True:
                message = await session.outbox.get()
                if message is None:
                    break
                yield message
        finally:
            reader.cancel()
            await self.registry.detach(session)
            if self.registry.sessions.get(session.name) is None:
                log.warning(
                    "site %s disconnected (version %s)",
                    session.name,
                    session.hello.software_version,
                )
                if self.registry.store is not None:
                    await asyncio.to_thread(
                        self.registry.store.site_seen, session.name, "disconnected"
                    )

    async def _read(self, session: SiteSession, request_iterator: Any) -> None:
        try:
            async for message in request_iterator:
                session.last_seen = time.monotonic()
                kind = message.WhichOneof("body")
                if kind == "reply":
                    self.registry.deliver(
                        session.name, message.reply.task_id, message, session.hello.signing_key
                    )
                elif kind == "refusal":
                    self.registry.deliver(session.name, message.refusal.task_id, message)
                elif kind == "audit_answer":
                    self.registry.answer_audit(message.audit_answer)
                elif kind == "study_decision":
                    await self.registry.receive_decisions(
                        session.name, [message.study_decision], session.hello.signing_key
                    )
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            session.outbox.put_nowait(None)
