"""A Flower ``Grid`` on Alliance's own round driver: Flower's strategies, our governed link.

Flower's ``Strategy.start`` runs unchanged in a worker thread with an :class:`AllianceGrid`.
Each ``send_and_receive`` it makes becomes one round of the :class:`~analyses.driver.
RoundDriver`: the messages' common content becomes the round's public state, the driver
carries it to every site as a task (approved study, allow-listed analysis, default deny,
ledger, audit at each site; or in process, in tests), and the sites' released records come back
as Flower reply messages. Flower's SuperLink, SuperNode and their sleeps are never involved.

The hand-off is a pair of queues: the strategy's thread blocks in ``send_and_receive`` until
the coordinator's half (``combine``) hands it the round's replies, and ``combine`` blocks until
the strategy either asks for the next round or finishes. Only one side runs at a time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from analyses.training.app import quiet_flower
from protocol.errors import InternalError

#: Node ids are small integers in Flower; ours number the sites from 2 (1 is Flower's own
#: SuperLink node id, which the coordinator's messages come from).
FIRST_NODE_ID = 2
#: The Flower run id Alliance's messages carry (one process, one identity; never checked).
ALLIANCE_RUN_ID = 1
#: How long the two sides wait for each other before giving up (a stuck strategy or an
#: abandoned request must not hold a thread for ever).
HANDOFF_SECONDS = 3600.0


@dataclass
class Round:
    """What the strategy asked for: one message per site (by name)."""

    messages: dict[str, Any]


@dataclass
class Finished:
    """The strategy's outcome (Flower's ``Result``), once the final evaluation ran."""

    result: Any


@dataclass
class Failed:
    """The strategy raised."""

    error: BaseException


class Abandoned(Exception):
    """Raised in the strategy's thread when the coordinator stops the run."""


def set_flower_identity() -> None:
    """Flower's process-wide task identity, which its ``Message`` constructor reads."""
    quiet_flower()
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = ALLIANCE_RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _grid_class() -> type:
    """:class:`AllianceGrid`'s class, built on first use (flwr takes a second to import)."""
    quiet_flower()
    from flwr.app import Message, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run

    class AllianceGrid(Grid):
        """``flwr.serverapp.Grid`` whose every round is a round of our driver."""

        def __init__(self, bridge: FlowerBridge) -> None:
            self._bridge = bridge
            self._run = Run.create_empty(ALLIANCE_RUN_ID)

        def set_run(self, run: Run) -> None:
            self._run = run

        @property
        def run(self) -> Run:
            return self._run

        def create_message(
            self,
            content: RecordDict,
            message_type: str,
            dst_node_id: int,
            group_id: str,
            ttl: float | None = None,
        ) -> Message:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return [self._bridge.node_ids[site] for site in self._bridge.active]

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            raise NotImplementedError(
                "Alliance carries each round whole: use send_and_receive (Flower's strategies do)"
            )

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            raise NotImplementedError(
                "Alliance carries each round whole: use send_and_receive (Flower's strategies do)"
            )

        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            return self._bridge.exchange(list(messages))

    return AllianceGrid


class FlowerBridge:
    """Runs a Flower strategy in a thread and hands its rounds to the round driver.

    Args:
        sites: the sites, in the driver's order.
        run: called in the thread with the grid; returns what :class:`Finished` carries.
    """

    def __init__(self, sites: list[str], run: Callable[[Any], Finished]) -> None:
        set_flower_identity()
        self.node_ids = {site: FIRST_NODE_ID + i for i, site in enumerate(sites)}
        self.sites_by_node = {node: site for site, node in self.node_ids.items()}
        self.active = list(sites)
        self._outbox: queue.Queue[Round | Finished | Failed] = queue.Queue()
        self._inbox: queue.Queue[list[Any] | None] = queue.Queue()
        self.grid = _grid_class()(self)
        self._run = run
        self._thread = threading.Thread(target=self._main, name="flower-strategy", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._outbox.put(self._run(self.grid))
        except Abandoned:
            return
        except BaseException as exc:  # handed to the coordinator's side, which raises it
            self._outbox.put(Failed(exc))

    def exchange(self, messages: list[Any]) -> list[Any]:
        """In the strategy's thread: one round out, its replies back."""
        if not messages:
            return []  # Flower configured nothing (evaluation off): no round is run
        by_site: dict[str, Any] = {}
        for message in messages:
            site = self.sites_by_node.get(message.metadata.dst_node_id)
            if site is None or site not in self.active:
                raise InternalError(
                    f"the strategy addressed unknown node {message.metadata.dst_node_id}"
                )
            by_site[site] = message
        self._outbox.put(Round(by_site))
        try:
            replies = self._inbox.get(timeout=HANDOFF_SECONDS)
        except queue.Empty:
            raise Abandoned from None
        if replies is None:
            raise Abandoned
        return replies

    def next(self) -> Round | Finished:
        """On the coordinator's side: wait for the strategy's next round or its end.

        Raises:
            InternalError: the strategy failed, or did not answer in time.
        """
        try:
            step = self._outbox.get(timeout=HANDOFF_SECONDS)
        except queue.Empty:
            raise InternalError("the Flower strategy did not answer in time") from None
        if isinstance(step, Failed):
            raise InternalError(
                f"the Flower strategy failed: {type(step.error).__name__}: {step.error}"
            ) from step.error
        return step

    def reply(self, replies: list[Any]) -> None:
        """On the coordinator's side: hand the strategy this round's replies."""
        self._inbox.put(replies)

    def close(self) -> None:
        """Stop the strategy's thread (a run that ends early)."""
        self._inbox.put(None)
