"""How work is handed to a conductor (DESIGN §2); callers go through ``conductor/door.py``.

The intent is written first: one compare-and-set takes the node's lock in the name of the
conductor the ring maps it to and stores the pending action with it. Only then is that
conductor woken. A lost wake-up is caught by the conductor's scan; a conductor that dies
keeps the lock and the action, and the new owner takes both over. Nothing accepted is lost.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol

import requests
from sqlalchemy import update
from sqlalchemy.sql.elements import ColumnElement

from labmetal import history
from labmetal.errors import NoConductor, NodeLocked, Unchanged
from labmetal.conductor.registry import ConductorRegistry
from labmetal.config import ConductorSettings
from labmetal.db import Database
from labmetal.models import Node

LOG = logging.getLogger(__name__)


class Wakeable(Protocol):
    hostname: str

    def wake(self) -> None: ...


class ConductorAPI:
    def __init__(self, db: Database, registry: ConductorRegistry, timings: ConductorSettings,
                 local: Wakeable | None = None):
        self.db = db
        self.registry = registry
        self.timings = timings
        self.local = local

    def request(self, node: Node, action: str, values: dict[str, Any],
                conditions: tuple[ColumnElement[bool], ...], event: tuple[str, str],
                user: str | None) -> str:
        """Lock ``node`` for its owner with ``action`` pending; returns the owner's name.

        ``conditions`` must still hold when the lock is taken (e.g. the provision state the
        caller checked). A busy node is retried a few times, as Ironic does, then refused.
        """
        owner = self.registry.owner(node.uuid)
        if owner is None:
            raise NoConductor(f"Cannot act on node {node.uuid}: no conductor is online to "
                              "carry out this request")
        statement = (update(Node)
                     .where(Node.id == node.id, Node.reservation.is_(None), *conditions)
                     .values(reservation=owner, pending_action=action, **values)
                     .execution_options(synchronize_session=False))
        for attempt in range(self.timings.lock_retries + 1):
            with self.db.write() as session:
                if session.execute(statement).rowcount == 1:  # type: ignore[attr-defined]
                    history.record(session, node.id, event[0], event[1], user=user)
                    break
            with self.db.read() as session:
                now = session.get(Node, node.id)
                holder = now.reservation if now is not None else None
            if holder is None:
                raise Unchanged(node.uuid)
            if attempt == self.timings.lock_retries:
                raise NodeLocked(node.uuid, holder)
            time.sleep(self.timings.lock_retry_interval)
        self.wake(owner)
        return owner

    def wake_all(self) -> None:
        """Room jobs are owned by one conductor, which any of them may be: wake them all."""
        for hostname in self.registry.live(force=True):
            self.wake(hostname)

    def wake(self, hostname: str) -> None:
        if self.local is not None and self.local.hostname == hostname:
            self.local.wake()
            return
        target = self.registry.live().get(hostname)
        if target is None or not target.wake_url:
            return  # its scan, or the conductor taking its nodes over, will find the work
        _post_in_background(target.wake_url)


def _post_in_background(url: str, post: Callable[..., Any] = requests.post) -> None:
    def send() -> None:
        try:
            post(url, timeout=1.0)
        except requests.RequestException as error:
            LOG.debug("wake-up to %s lost (%s); the conductor's scan will pick the work up",
                      url, error)
    threading.Thread(target=send, daemon=True, name="wake").start()
