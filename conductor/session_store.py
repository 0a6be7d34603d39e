"""The students' sessions' store as a service of its own: the overlay backend (local qcow2
or Ceph RBD clones, images/overlays), the iSCSI target server that exports the running
sessions, and the watcher that ends or fails sessions whose seat or target went away.

It is stateful (a backend process tree, a watcher thread, a hook at exit) and so it lives
here, apart from the stateless API views that use it (api/sessions.py, api/boot.py,
api/session_export.py): one per process, made on first use. Refusals are the domain errors
of labmetal/errors.py and the backend's OverlayError, which the API maps to HTTP in one
place.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import select, update

from labmetal import states
from labmetal.errors import Conflict, Failed, Refused, Unavailable
from labmetal.config import SessionStoreSettings
from labmetal.db import Database
from labmetal.images.overlays.base import OverlayBackend, OverlayError, Quota
from labmetal.images.overlays.tgt import SessionTargets
from labmetal.lifecycles import (SESSION_BUSY, SESSION_FAILED, SESSION_RUNNING,
                                 SESSION_STARTING, SESSION_STOPPED)
from labmetal.models import Node, StudentSession

LOG = logging.getLogger(__name__)
MiB = 2**20
WATCH_INTERVAL = 3.0
BUSY = SESSION_BUSY


class Storage:
    """The backend, its lock, and the watcher that marks sessions whose target died."""

    def __init__(self, settings: SessionStoreSettings, db: Database):
        self.settings = settings
        self.db = db
        self.lock = threading.RLock()
        self.starting: set[str] = set()  # sessions this process is starting now
        self.seen_on: set[str] = set()  # running sessions whose seat was seen powered on
        self.last_connected: dict[str, float] = {}  # session -> when a seat was logged in
        self._backend: OverlayBackend | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.settings.overlay_backend

    @contextmanager
    def backend(self) -> Iterator[OverlayBackend]:
        """The backend, made on first use, held for the caller alone."""
        with self.lock:
            if self._backend is None:
                self._backend = self._make()
                atexit.register(self.close)
                self._watcher = threading.Thread(target=self._watch, name="session-watcher",
                                                 daemon=True)
                self._watcher.start()
            yield self._backend

    def _make(self) -> OverlayBackend:
        settings = self.settings
        host, port = settings.iscsi_portal_host_port
        run_dir = settings.overlay_run_path
        targets = SessionTargets(run_dir / "tgt", host, port)
        quota = Quota(per_session=settings.session_quota_mib * MiB or None)
        backend: OverlayBackend
        if settings.overlay_backend == "ceph":
            from labmetal.images.overlays.ceph import CephOverlays
            backend = CephOverlays(settings.ceph_conf, settings.ceph_pool, targets,
                                   client_id=settings.ceph_client, quota=quota,
                                   timeout=settings.ceph_timeout,
                                   bulk_timeout=settings.ceph_bulk_timeout,
                                   object_order=settings.ceph_object_order)
        else:
            from labmetal.images.overlays.local import LocalOverlays
            backend = LocalOverlays(settings.overlay_path, targets, run_dir=run_dir / "qsd",
                                    quota=quota)
            backend.validate()  # tools and FUSE; Ceph is reached when first used instead
        LOG.info("session store: %s, iSCSI portal %s:%d", backend.name, host, port)
        return backend

    def admit_only(self, session_uuid: str, address: str) -> None:
        """The session's target lets in the seat's ``address`` alone from now on (its boot
        script, with the CHAP account, just went there: api/boot.py). Raises Refused if
        this process does not serve the session, OverlayError if its target server
        refuses."""
        if not self.lock.acquire(timeout=30):
            raise Unavailable("the session store is busy; ask again")
        try:
            if self._backend is None or not self._backend.is_exported(session_uuid):
                raise Conflict(f"Session {session_uuid} is not served by this process")
            self._backend.admit_only(session_uuid, address)
        finally:
            self.lock.release()

    def close(self) -> None:
        """Stop the target server and what serves the disks (not the data)."""
        self._stop.set()
        with self.lock:
            backend, self._backend = self._backend, None
            if backend is not None:
                backend.close()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                self.reconcile(wait=True)
                self.end_disconnected()
            except Exception:  # noqa: BLE001 - a watcher that dies would hide every fault
                LOG.exception("checking the running sessions failed")

    def end_disconnected(self) -> None:
        """End the running sessions whose seat logged in to its target and has been gone
        for ``session_disconnect_end`` seconds: the seat was switched off or crashed in a
        way its power state does not show (a Wake-on-LAN seat's never does). The seat's
        own boot logs in twice (iPXE, then the OS), a few seconds apart."""
        limit = self.settings.session_disconnect_end
        with self.lock:
            if self._backend is None or not limit:
                return
            connected = self._backend.connected()
            exported = {uuid for uuid in self._backend_sessions() if
                        self._backend.is_exported(uuid)}
        now = time.monotonic()
        self.last_connected = {uuid: now if uuid in connected else seen
                               for uuid, seen in self.last_connected.items()
                               if uuid in exported}
        self.last_connected.update({uuid: now for uuid in connected})
        for uuid, seen in list(self.last_connected.items()):
            if now - seen > limit:
                del self.last_connected[uuid]
                try:
                    self.end(uuid, f"its seat has not been logged in to its disk for "
                                   f"{limit:.0f} s (switched off, or gone)")
                except (Refused, OverlayError) as error:
                    LOG.warning("ending session %s: %s", uuid, error)

    def _backend_sessions(self) -> list[str]:
        with self.db.read() as session:
            return list(session.scalars(select(StudentSession.uuid).where(
                StudentSession.state == SESSION_RUNNING, StudentSession.backend == self.name,
                StudentSession.mode != "local")))

    def end(self, session_uuid: str, why: str) -> None:
        """Remove the session's target (its seat can no longer reach the disk) and mark it
        stopped; its data stays."""
        with self.backend() as backend:
            backend.unexport(session_uuid)
            if backend.is_exported(session_uuid):
                raise Failed(f"Session {session_uuid}'s iSCSI target could not be removed; "
                             "see the log")
            with self.db.write() as session:
                ses = session.scalar(select(StudentSession).where(
                    StudentSession.uuid == session_uuid))
                assert ses is not None  # a session is deleted only once it is stopped
                ses.state, ses.seat_node_id = SESSION_STOPPED, None
                ses.target_iqn = ses.target_portal = None
                refresh_used(backend, ses)
        LOG.info("session %s ended: %s", session_uuid, why)

    def reconcile(self, wait: bool = False) -> None:
        """Mark ``failed`` the running sessions no longer exported by this process, and the
        ``starting`` ones no request of this process is starting; end the sessions whose
        seat was seen on and is now off (powered off, or the OS shut down: the student
        left)."""
        with self.db.read() as session:
            found = session.execute(
                select(StudentSession.uuid, StudentSession.state, Node.name, Node.uuid,
                       Node.power_state, Node.target_power_state)
                .outerjoin(Node, Node.id == StudentSession.seat_node_id)
                .where(StudentSession.state.in_(BUSY), StudentSession.mode != "local",
                       StudentSession.backend == self.name)).all()
        self.seen_on &= {row[0] for row in found}
        for uuid, state, _, _, power, _ in found:
            if state == SESSION_RUNNING and power == states.POWER_ON:
                self.seen_on.add(uuid)
        for uuid, state, seat_name, seat_uuid, power, target in found:
            if (state == SESSION_RUNNING and uuid in self.seen_on and power == states.POWER_OFF
                    and target is None):
                self.seen_on.discard(uuid)
                try:
                    self.end(uuid, f"seat {seat_name or seat_uuid} was powered off")
                except (Refused, OverlayError) as error:
                    LOG.warning("ending session %s: %s", uuid, error)
        rows = [row[:4] for row in found]
        if not rows:
            return
        if not self.lock.acquire(timeout=30 if wait else 0):
            return  # a long backend call runs; the watcher checks again soon
        try:
            gone = []
            for uuid, state, seat_name, seat_uuid in rows:
                if state == SESSION_STARTING:
                    if uuid not in self.starting:
                        gone.append((uuid, SESSION_STARTING, "its start was interrupted (labmetal "
                                     "restarted)"))
                elif self._backend is None or not self._backend.is_exported(uuid):
                    gone.append((uuid, SESSION_RUNNING, f"its iSCSI target on seat "
                                 f"{seat_name or seat_uuid} stopped (the target server died "
                                 "or labmetal restarted); start it again to resume it with "
                                 "its data"))
        finally:
            self.lock.release()
        for uuid, state, why in gone:
            with self.db.write() as session:
                changed = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                    update(StudentSession)
                    .where(StudentSession.uuid == uuid, StudentSession.state == state)
                    .values(state=SESSION_FAILED, seat_node_id=None, target_iqn=None,
                            target_portal=None, last_error=f"Session {uuid} failed: {why}")
                ).rowcount
            if changed:
                LOG.warning("session %s failed: %s", uuid, why)


def refresh_used(backend: OverlayBackend, ses: StudentSession) -> None:
    try:
        ses.used_bytes = backend.used_bytes(ses.uuid)
    except OverlayError as error:
        LOG.warning("cannot measure session %s: %s", ses.uuid, error)
