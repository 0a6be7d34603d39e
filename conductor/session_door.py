"""The one door to students' sessions, in the shape of the nodes' (``conductor/door.py``) and
the room jobs' (``conductor/job_door.py``): create, start on a seat, stop, save, revert,
reset and delete are decided here, against the session store (conductor/session_store.py),
and the seat is booted through the nodes' door.

The API's views (api/sessions.py, api/seat_login.py, api/room_tp.py) authorize the caller
and render the result; everything between is here, so that the session's rules hold the
same whichever page, command or seat asks. Refusals are the domain errors of
``labmetal/errors.py`` and the store's OverlayError, mapped to HTTP in one place.
"""
from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from labmetal import states
from labmetal.conductor.door import Asker, NodeDoor
from labmetal.errors import Conflict, Forbidden, InvalidRequest, NotFound, Refused
from labmetal.conductor.session_store import Storage, refresh_used
from labmetal.db import Database
from labmetal.images.overlays.base import OverlayBackend, OverlayError, Reason
from labmetal.lifecycles import (SESSION_BUSY, SESSION_DELETED, SESSION_LIVE, SESSION_RUNNING,
                                 SESSION_STARTING, SESSION_STOPPED, SESSION_SYNCING)
from labmetal.lookup import find_node, find_session, find_template
from labmetal.models import (Node, Seat, SessionSave, StudentSession, Template, TemplateVersion,
                             User, new_uuid, utcnow)
from labmetal.names import seat_iqn, session_iqn
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)
MiB = 2**20


class SessionDoor:
    def __init__(self, db: Database, box: SecretBox, store: Storage, nodes: NodeDoor,
                 class_quota_mib: int):
        self.db = db
        self.box = box
        self.store = store
        self.nodes = nodes
        self.class_quota_mib = class_quota_mib

    @contextmanager
    def backend(self) -> Iterator[OverlayBackend]:
        """The store's backend for one step; its refusals logged, then passed on."""
        try:
            with self.store.backend() as backend:
                yield backend
        except OverlayError as error:
            LOG.warning("session store: %s", error)
            raise

    # -- a session's life ------------------------------------------------------------------
    def create(self, template_ident: str, student_name: str, version_number: int | None,
               by: Asker) -> str:
        """The student's session of the template (its latest version by default); one live
        session per student and template. Its UUID."""
        with self.db.read() as session:
            template = find_template(session, template_ident)
            student = session.scalar(select(User).where(User.name == student_name))
            if student is None or student.disabled:
                raise InvalidRequest(f"No user {student_name} (field: student)")
            versions = {v.version: v for v in template.versions}
            if not versions:
                raise Conflict(f"Template {template.name} has no version yet.")
            version = versions.get(version_number or max(versions))
            if version is None:
                raise NotFound(f"Template {template.name} has no version {version_number} "
                               f"(versions: {', '.join(map(str, sorted(versions)))})")
            if version.backend != self.store.name:
                raise Conflict(f"Template {template.name} version {version.version} is kept "
                               f"by the {version.backend} store, and sessions are made in the "
                               f"{self.store.name} store (overlay_backend)")
            version_ids = [v.id for v in template.versions]
            existing = _live_session(session, student.id, version_ids)
            if existing:
                raise Conflict(f"{student.name} already has a session of template "
                               f"{template.name}: {existing}; start it, or delete it first")
        session_uuid = new_uuid()
        with self.backend() as backend:
            self._check_class_quota(backend, template.id,
                                    f"cannot create a session of {template.name}")
            disk = backend.create_session(session_uuid, version.backend_key, version.version)
            try:
                with self.db.write() as session:
                    if _live_session(session, student.id, version_ids):  # a racing request's
                        raise Conflict(f"{student.name} already has a session of template "
                                       f"{template.name}")
                    session.add(StudentSession(
                        uuid=session_uuid, user_id=student.id, template_version_id=version.id,
                        backend=backend.name, state=SESSION_STOPPED,
                        used_bytes=disk.used_bytes,
                        chap_user=f"lm{session_uuid.replace('-', '')[:16]}",
                        chap_secret=self.box.seal(chap_secret()), created_by=by.user))
            except Exception:
                try:  # nothing of it is kept if it is not recorded
                    backend.delete(session_uuid)
                except OverlayError as error:
                    LOG.warning("removing unrecorded session %s: %s", session_uuid, error)
                raise
        LOG.info("session %s of template %s version %d created for %s by %s", session_uuid,
                 template.name, version.version, student.name, by.user)
        return session_uuid

    def start(self, ident: str, seat_ident: str, by: Asker, may_power_nodes: bool) -> str:
        """Export the session to the seat alone (its initiator name and a fresh CHAP
        secret); the session's UUID. ``may_power_nodes``: the asker may power any node
        (else only a room's seat, not in maintenance nor busy: see check_seat)."""
        self.store.reconcile()
        with self.db.read() as session:
            ses = find_session(session, ident)
            session_uuid = ses.uuid
            mode = session_mode(ses.template_version)
        if mode == "local":
            return self._start_local(ident, seat_ident, by, may_power_nodes)
        self.store.starting.add(session_uuid)
        try:
            with self.db.write() as session:
                ses = find_session(session, ident)
                node = find_node(session, seat_ident)
                if ses.state in SESSION_BUSY:
                    raise Conflict(f"Session {ses.uuid} is already {ses.state} on seat "
                                   f"{_seat_name(ses)}; one seat at a time: stop it there "
                                   "first")
                other = session.scalar(select(StudentSession.uuid).where(
                    StudentSession.seat_node_id == node.id,
                    StudentSession.state.in_(SESSION_BUSY)))
                if other:
                    raise Conflict(f"Seat {node.name or node.uuid} is in use by another "
                                   "session")
                check_seat(session, node, may_power_nodes)
                previous = ses.state
                ses.state, ses.seat_node_id, ses.mode = SESSION_STARTING, node.id, "iscsi"
                seat_name, seat_uuid = node.name or node.uuid, node.uuid
                template_id = ses.template_version.template_id
                # A new CHAP secret at each start: one read from a seat's boot script while
                # the session ran is worth nothing once it ended.
                chap_user, secret = ses.chap_user, chap_secret()
                ses.chap_secret = self.box.seal(secret)
                ses.seat_address = None  # the next boot script binds it (api/boot.py)
            try:
                with self.backend() as backend:
                    self._check_class_quota(backend, template_id,
                                            f"cannot start session {session_uuid}")
                    export = backend.export(session_uuid, session_iqn(session_uuid),
                                            chap_user, secret, [seat_iqn(seat_uuid)])
                    used = backend.used_bytes(session_uuid)
            except Exception as error:
                message = str(error) if isinstance(error, (Refused, OverlayError)) \
                    else f"{type(error).__name__}, see the API log"
                with self.db.write() as session:  # as it was: the session did not start
                    ses = find_session(session, ident)
                    ses.state, ses.seat_node_id = previous, None
                    ses.last_error = f"Starting on seat {seat_name} failed: {message}"
                raise
            with self.db.write() as session:
                ses = find_session(session, ident)
                ses.state, ses.started_at, ses.last_error = SESSION_RUNNING, utcnow(), None
                ses.target_iqn, ses.target_portal = export.iqn, export.portal
                ses.used_bytes = used
        finally:
            self.store.starting.discard(session_uuid)
        LOG.info("session %s running on seat %s (%s)", session_uuid, seat_name, export.iqn)
        return session_uuid

    def _start_local(self, ident: str, seat_ident: str, by: Asker,
                     may_power_nodes: bool) -> str:
        """A local session (issue 16): marked starting on the seat; the seat's next boot
        is labmetal's ramdisk, which puts the template and the student's blocks on its
        disk (conductor/seat_sync.py), then the session's own boot. A session whose newest
        state is still on another seat's disk is brought back from there first."""
        wake: tuple[str, str] | None = None
        with self.db.write() as session:
            ses = find_session(session, ident)
            node = find_node(session, seat_ident)
            if ses.state in SESSION_BUSY and ses.seat_node_id != node.id:
                where = _seat_name(ses)
                if ses.mode == "local" and ses.state == SESSION_RUNNING:
                    ses.state = SESSION_SYNCING  # its end is on that seat's disk
                    wake = (ses.seat.uuid, f"to upload session {ses.uuid}") \
                        if ses.seat is not None else None
                if ses.mode == "local" and ses.state == SESSION_SYNCING:
                    message = (f"Session {ses.uuid}'s newest state is on seat {where}'s "
                               "disk: labmetal is powering that seat on to upload it; "
                               "resume here once it is stopped (a minute or two)")
                else:
                    message = (f"Session {ses.uuid} is already {ses.state} on seat {where}; "
                               "one seat at a time: stop it there first")
                ses.last_error = message if wake else ses.last_error
            else:
                message = ""
                other = session.scalar(select(StudentSession.uuid).where(
                    StudentSession.seat_node_id == node.id, StudentSession.id != ses.id,
                    StudentSession.state.in_(SESSION_BUSY)))
                if other:
                    raise Conflict(f"Seat {node.name or node.uuid} is in use by another "
                                   "session")
                check_seat(session, node, may_power_nodes)
                if ses.state == SESSION_STOPPED or ses.state not in SESSION_BUSY:
                    ses.state, ses.seat_node_id = SESSION_STARTING, node.id
                ses.mode, ses.last_error = "local", None
                ses.target_iqn = ses.target_portal = ses.seat_address = None
            session_uuid, seat_name = ses.uuid, node.name or node.uuid
        if wake is not None:
            why = self.boot_seat(wake[0], wake[1], by)
            if why:
                LOG.warning("session %s: its seat could not be woken to upload: %s",
                            session_uuid, why)
        if message:
            raise Conflict(message)
        LOG.info("session %s starting on seat %s's disk (local)", session_uuid, seat_name)
        return session_uuid

    def boot_on(self, ident: str, by: Asker) -> None:
        """Boot the seat a session was just started on; what went wrong, if it could not
        be asked, is the session's last error (the student powers it on by hand)."""
        with self.db.read() as session:
            ses = find_session(session, ident)
            node = ses.seat
            if node is None:
                return
            seat_name, seat_uuid = node.name or node.uuid, node.uuid
        why_not = self.boot_seat(seat_uuid, f"to boot session {ses.uuid}", by)
        if why_not:
            with self.db.write() as session:
                ses = find_session(session, ident)
                ses.last_error = (f"Session running, but seat {seat_name} was not booted: "
                                  f"{why_not}; power it on by hand")

    def boot_seat(self, node_uuid: str, reason: str, by: Asker) -> str | None:
        """Ask the seat's conductor to power it on, or to reboot it if it is on (its next
        boot script is what it boots); why not, if it cannot be asked."""
        with self.db.read() as session:
            node = find_node(session, node_uuid)
        try:
            self.nodes.boot(node, reason, by)
        except Refused as error:
            return error.message
        return None

    def stop(self, ident: str, by: Asker) -> None:
        """The seat is done with it (powered off, logged out): its target goes, the data
        stays in the session."""
        with self.db.read() as session:
            ses = find_session(session, ident)
        if ses.mode == "local" and ses.state in SESSION_BUSY:
            self._stop_local(ident, by)
            return
        if ses.state == SESSION_STARTING:
            raise Conflict(f"Session {ses.uuid} is being started; try again in a moment")
        if ses.state != SESSION_STOPPED:
            self.store.end(ses.uuid, f"stopped by {by.user}")

    def _stop_local(self, ident: str, by: Asker) -> None:
        """A local session ends on its seat: one that was running is brought back (the
        seat reboots into labmetal's ramdisk, uploads, and powers off); one still starting
        is simply not started."""
        with self.db.write() as session:
            ses = find_session(session, ident)
            seat = ses.seat.uuid if ses.seat is not None else None
            if ses.state == SESSION_STARTING:
                ses.state, ses.seat_node_id = SESSION_STOPPED, None
                seat = None
            elif ses.state == SESSION_RUNNING:
                ses.state = SESSION_SYNCING
        if seat is not None:
            why = self.boot_seat(seat, f"to upload session {ses.uuid}", by)
            if why:
                with self.db.write() as session:
                    find_session(session, ident).last_error = (
                        f"Its seat could not be rebooted to upload it: {why}; it uploads at "
                        "its next boot")
        LOG.info("session %s stopped by %s", ses.uuid, by.user)

    def save(self, ident: str, label: str, by: Asker) -> str | None:
        """A save point (running or not: what the seat wrote is flushed first); its
        UUID. A local session running on a seat holds its newest state on that seat's
        disk: the save is queued and made once the seat's upload is verified (None)."""
        with self.db.write() as session:
            ses = find_session(session, ident)
            if ses.mode == "local" and ses.state in (SESSION_RUNNING, SESSION_SYNCING):
                if not isinstance(label, str) or not 0 < len(label) <= 64:
                    raise InvalidRequest("a save label has 1 to 64 characters")
                ses.pending_save, ses.pending_save_by = label, by.user
                LOG.info("session %s: save %r queued by %s until its seat uploads it",
                         ses.uuid, label, by.user)
                return None
        with self.db.read() as session:
            ses = find_session(session, ident)
            if ses.state == SESSION_STARTING:
                raise Conflict(f"Session {ses.uuid} is being started; try again in a moment")
        with self.backend() as backend:
            point = backend.save(ses.uuid, label)
            with self.db.write() as session:
                ses = find_session(session, ident)
                created = point.created_at.astimezone(UTC).replace(tzinfo=None)
                save = SessionSave(session_id=ses.id, number=point.number, label=label,
                                   backend_save_id=point.save_id, created_by=by.user,
                                   created_at=created)
                session.add(save)
                ses.last_saved_at = utcnow()
                refresh_used(backend, ses)
                session.flush()
                save_uuid = save.uuid
        LOG.info("session %s saved as %s by %s", ses.uuid, point.save_id, by.user)
        return save_uuid

    def revert(self, ident: str, wanted: str, by: Asker) -> None:
        """Back to that save point (by UUID, number or label: the latest of that label);
        the changes since are lost, later save points stay."""
        with self.db.read() as session:
            ses = find_session(session, ident)
            refuse_if_busy(ses, "reverted")
            save = find_save(ses, wanted)
        with self.backend() as backend:
            backend.revert(ses.uuid, save.backend_save_id)
            with self.db.write() as session:
                ses = find_session(session, ident)
                ses.last_error = None
                refresh_used(backend, ses)
        LOG.info("session %s reverted to %s by %s", ses.uuid, save.backend_save_id, by.user)

    def reset(self, ident: str, by: Asker) -> None:
        """Back to its template version: the session's changes and save points go."""
        with self.db.read() as session:
            ses = find_session(session, ident)
            refuse_if_busy(ses, "reset")
        with self.backend() as backend:
            backend.reset(ses.uuid)
            with self.db.write() as session:
                ses = find_session(session, ident)
                session.execute(delete(SessionSave).where(SessionSave.session_id == ses.id))
                ses.last_saved_at = ses.last_error = None
                refresh_used(backend, ses)
        LOG.info("session %s reset to its template by %s", ses.uuid, by.user)

    def delete(self, ident: str, by: Asker) -> None:
        with self.db.read() as session:
            ses = find_session(session, ident)
            refuse_if_busy(ses, "deleted")
        with self.backend() as backend:
            try:
                backend.delete(ses.uuid)
            except OverlayError as error:
                if error.reason is not Reason.NOT_FOUND:
                    raise
            with self.db.write() as session:
                ses = find_session(session, ident)
                ses.state = SESSION_DELETED
                ses.used_bytes = 0
                session.execute(delete(SessionSave).where(SessionSave.session_id == ses.id))
        LOG.info("session %s deleted by %s", ses.uuid, by.user)

    def _check_class_quota(self, backend: OverlayBackend, template_id: int, what: str) -> None:
        """Every live session of the template together under ``class_quota_mib``."""
        limit = self.class_quota_mib * MiB
        if not limit:
            return
        with self.db.read() as session:
            name = session.scalar(select(Template.name).where(Template.id == template_id))
            rows = session.execute(
                select(StudentSession.uuid, StudentSession.state, StudentSession.used_bytes)
                .join(TemplateVersion,
                      TemplateVersion.id == StudentSession.template_version_id)
                .where(TemplateVersion.template_id == template_id,
                       StudentSession.state.in_(SESSION_LIVE))).all()
        used = 0
        for uuid, state, stored in rows:
            used += backend.used_bytes(uuid) if state == SESSION_RUNNING else stored
        if used >= limit:
            raise OverlayError(f"{what}: the sessions of template {name} use "
                               f"{mib(used)} of their class quota of {mib(limit)} "
                               "(class_quota_mib); a teacher can reset or delete some",
                               Reason.QUOTA)


# -- rules and lookups the views share ---------------------------------------------------
def check_seat(session: Session, node: Node, may_power_nodes: bool) -> None:
    """May the asker start a session on this node? Starting one powers the node on or
    reboots it (or makes its next boot the session's), so an asker who may not power nodes
    (``node:set_power_state``: students, by default) may start only on a seat of a room,
    and only one that is not in maintenance nor in the middle of a provisioning action.
    Nobody starts a session on a node that boots labmetal's ramdisk (deploy, clean,
    inspect, capture)."""
    name = node.name or node.uuid
    if node.provision_state in states.RAMDISK_MODE:
        raise Conflict(f"Seat {name} is {node.provision_state}: it boots labmetal's ramdisk "
                       "until that is done")
    if may_power_nodes:
        return
    if session.scalar(select(Seat.id).where(Seat.node_id == node.id)) is None:
        raise Forbidden(f"Node {name} is not a seat of a room: a session starts on a "
                        "room's seat")
    if node.maintenance:
        raise Conflict(f"Seat {name} is in maintenance; ask a teacher or an admin")
    if node.target_provision_state is not None:
        raise Conflict(f"Seat {name} is {node.provision_state} (to "
                       f"{node.target_provision_state}); try again when that is done")


def session_mode(version: TemplateVersion) -> str:
    """How a session of this version runs: its template's choice, "auto" being local where
    the version can boot that way (its kernel and labmetal's session initramfs were made
    for it), else diskless over iSCSI."""
    wanted = version.template.session_mode
    local = bool(version.session_kernel and version.session_initramfs)
    if wanted == "local" and not local:
        raise Conflict(f"Template {version.template.name} v{version.version} cannot run as "
                       f"a local session: {version.local_boot_error or 'no session boot made'}")
    if wanted == "iscsi":
        return "iscsi"
    return "local" if local else "iscsi"


def refuse_if_busy(ses: StudentSession, what: str) -> None:
    if ses.state in SESSION_BUSY:
        raise Conflict(f"Session {ses.uuid} is {ses.state} on seat {_seat_name(ses)} and "
                       f"cannot be {what}; stop it first (power off or log out)")


def find_save(ses: StudentSession, wanted: str) -> SessionSave:
    """By UUID, number, label (the latest of that label) or the store's save id."""
    matches = [s for s in ses.saves if str(wanted) in (s.uuid, str(s.number), s.label,
                                                       s.backend_save_id)]
    if not matches:
        raise NotFound(f"Session {ses.uuid} has no save point {wanted}")
    return matches[-1]


def chap_secret() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


def mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


def _live_session(session: Session, user_id: int, version_ids: list[int]) -> str | None:
    return session.scalar(select(StudentSession.uuid).where(
        StudentSession.user_id == user_id, StudentSession.state.in_(SESSION_LIVE),
        StudentSession.template_version_id.in_(version_ids)))


def _seat_name(ses: StudentSession) -> str:
    return (ses.seat.name or ses.seat.uuid) if ses.seat is not None else "?"
