"""Who is alive: the conductors table read back as a hash ring, refreshed at most every second."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from labmetal.conductor.hashring import HashRing
from labmetal.db import Database
from labmetal.models import Conductor, utcnow


@dataclass(frozen=True)
class LiveConductor:
    hostname: str
    wake_url: str | None


class ConductorRegistry:
    def __init__(self, db: Database, dead_after: float, refresh: float = 1.0):
        self.db = db
        self.dead_after = dead_after
        self.refresh = refresh
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._live: dict[str, LiveConductor] = {}
        self._ring = HashRing([])

    def _reload(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._read_at < self.refresh:
                return
            cutoff = utcnow() - timedelta(seconds=self.dead_after)
            with self.db.read() as session:
                rows = session.execute(select(Conductor.hostname, Conductor.wake_url).where(
                    Conductor.online.is_(True), Conductor.heartbeat_at >= cutoff)).all()
            live = {row.hostname: LiveConductor(row.hostname, row.wake_url) for row in rows}
            if set(live) != set(self._live):
                self._ring = HashRing(live)
            self._live = live
            self._read_at = time.monotonic()

    def live(self, force: bool = False) -> dict[str, LiveConductor]:
        self._reload(force)
        return self._live

    def ring(self, force: bool = False) -> HashRing:
        self._reload(force)
        return self._ring

    def owner(self, node_uuid: str) -> str | None:
        return self.ring().owner(node_uuid)
