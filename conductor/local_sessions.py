"""Local sessions' ends, kept by the conductor that owns the seat (issue 16).

A local session runs from its seat's disk; when its OS powers the seat off (the student
shut it down, or left), the session's newest state is on that disk. The session becomes
``syncing`` and the seat is powered on into labmetal's ramdisk, which uploads it and powers
off again (conductor/seat_sync.py).

Who notices belongs to the hash ring, like everything else about a node: the conductor
that owns the seat reads its power from the BMC (conductor/service.py's power sync), and a
change it sees from on to off while a local session runs there is the end. The last state
read is in the database, so a conductor that takes a dead peer's seats over sees the same
change; no API process is involved, and none watches.

A seat that should be uploading and is still off after ``wake_again_after`` seconds is
powered on again: the conductor that marked it syncing may have died before it asked, or
a Wake-on-LAN packet was lost.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from sqlalchemy import select, update

from labmetal import states
from labmetal.conductor.door import Asker, NodeDoor
from labmetal.db import Database
from labmetal.errors import Refused
from labmetal.lifecycles import SESSION_RUNNING, SESSION_SYNCING
from labmetal.lookup import find_node
from labmetal.models import Node, StudentSession

LOG = logging.getLogger(__name__)


class LocalSessionKeeper:
    def __init__(self, db: Database, door: NodeDoor, hostname: str, wake_again_after: float):
        self.db = db
        self.door = door
        self.asker = Asker(conductor=hostname)
        self.wake_again_after = wake_again_after
        self._off_since: dict[str, float] = {}  # syncing session -> when its seat was seen off

    def seats_powered_off(self, node_ids: Iterable[int]) -> None:
        """The power sync read these seats off where the last state read was on: a local
        session running on one of them ended there. The change is a compare-and-set, so a
        racing stop from the API wakes the seat once."""
        ids = list(node_ids)
        if not ids:
            return
        with self.db.read() as session:
            rows = session.execute(
                select(StudentSession.uuid, Node.uuid).join(
                    Node, Node.id == StudentSession.seat_node_id)
                .where(Node.id.in_(ids), StudentSession.mode == "local",
                       StudentSession.state == SESSION_RUNNING)).all()
        for session_uuid, node_uuid in rows:
            with self.db.write() as session:
                changed = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                    update(StudentSession).where(StudentSession.uuid == session_uuid,
                                                 StudentSession.state == SESSION_RUNNING)
                    .values(state=SESSION_SYNCING)).rowcount
            if changed:
                LOG.info("local session %s ended (its seat was powered off); waking it to "
                         "upload", session_uuid)
                self._wake(session_uuid, node_uuid)

    def check(self, owns: Callable[[str], bool]) -> None:
        """Power on again the seats of this conductor's syncing sessions that stayed off
        (``owns``: whether the ring gives a node, by UUID, to this conductor)."""
        with self.db.read() as session:
            rows = session.execute(
                select(StudentSession.uuid, Node.uuid, Node.power_state, Node.reservation,
                       Node.maintenance)
                .join(Node, Node.id == StudentSession.seat_node_id)
                .where(StudentSession.mode == "local",
                       StudentSession.state == SESSION_SYNCING)).all()
        now = time.monotonic()
        waiting = {}
        for session_uuid, node_uuid, power, reservation, maintenance in rows:
            if (not owns(node_uuid) or power != states.POWER_OFF or reservation is not None
                    or maintenance):
                continue
            since = waiting[session_uuid] = self._off_since.get(session_uuid, now)
            if now - since >= self.wake_again_after:
                LOG.warning("session %s: its seat is still off %.0f s after it was to "
                            "upload; powering it on again", session_uuid, now - since)
                waiting[session_uuid] = now
                self._wake(session_uuid, node_uuid)
        self._off_since = waiting

    def _wake(self, session_uuid: str, node_uuid: str) -> None:
        try:
            with self.db.read() as session:
                node = find_node(session, node_uuid)
            self.door.boot(node, f"to upload session {session_uuid}", self.asker)
        except Refused as error:
            LOG.warning("session %s: its seat could not be woken to upload (%s); it uploads "
                        "at its next boot", session_uuid, error.message)
