"""/v1/templates and /v1/sessions: teachers' TP templates (frozen versions of a disk image)
and students' sessions of them, each a copy-on-write disk that a seat boots over iSCSI
(DESIGN §5, issue 7).

The storage backend (images/overlays: ``local`` qcow2 overlays or ``ceph`` RBD clones) and
the iSCSI target server it starts live in this API process: one backend object, made from
the settings on first use, used under one lock (backends are not thread-safe), closed when
the process exits. So ``running`` in the database means "exported by this process": a
running session whose target is gone (tgtd killed, or labmetal restarted) is marked
``failed`` (by a watcher every few seconds and before every request here), and is started
again with its data. One API process serves sessions: several would each start their own
target server on the same portal.

Session states: ``stopped`` -> ``starting`` -> ``running`` -> ``stopped``; ``failed`` when
its target died under it (start it again); ``deleted``. A backend refusal leaves the state
as it was: Ceph down is a 503 with Ceph's clear message, a quota a 413 with the numbers.
The CHAP secret of a session is sealed at rest and never returned or logged.
"""
from __future__ import annotations

import atexit
import logging
import re
import secrets
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

from flask import Blueprint, current_app, g, request
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labmetal import states
from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import caller_name, find_node, is_uuid, isotime, links
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.images import image_store
from labmetal.api.validation import Field, body, obj, query
from labmetal.conductor.door import Asker
from labmetal.conductor.errors import Refused
from labmetal.config import SessionStoreSettings
from labmetal.db import Database
from labmetal.images import boot_files
from labmetal.images.overlays.base import OverlayBackend, OverlayError, Quota, Reason
from labmetal.images.overlays.tgt import SessionTargets
from labmetal.lifecycles import (SESSION_BUSY, SESSION_DELETED, SESSION_FAILED, SESSION_LIVE,
                                 SESSION_RUNNING, SESSION_STARTING, SESSION_STOPPED)
from labmetal.lookup import NOT_ACTIVE, WRONG_KIND, ImageUnusable, usable_image
from labmetal.models import (Image, Node, Seat, SessionSave, StudentSession, Template,
                             TemplateVersion, User, new_uuid, utcnow)
from labmetal.names import seat_iqn, session_iqn
from labmetal.policy import Verdict

LOG = logging.getLogger(__name__)
blueprint = Blueprint("sessions", __name__)

MiB = 2**20
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,53}")  # + "-" + 8 = the backend's 63
LIVE = SESSION_LIVE  # not deleted
BUSY = SESSION_BUSY
WATCH_INTERVAL = 3.0
STATUS = {Reason.UNAVAILABLE: 503, Reason.QUOTA: 413, Reason.NOT_FOUND: 404,
          Reason.BUSY: 409, Reason.INVALID: 400, Reason.FAILED: 500}


_DESCRIPTION = Field("description", str | None, description="free text, for people")
_IMAGE = Field("image", str, required=True, description="an active whole-disk image's name "
               "or UUID, frozen into the version")
NEW_TEMPLATE = obj("a template", Field(
    "name", str, required=True, pattern=f"^{TEMPLATE_NAME.pattern}$", example="net-tp",
    error="Invalid template name {value!r}: 1-54 lower-case letters, digits and '-', "
          "starting with a letter or digit"), _IMAGE, _DESCRIPTION)
NEW_VERSION = obj("a template version", _IMAGE, _DESCRIPTION)
NEW_SESSION = obj("a session", Field("template", str, required=True,
                                     description="the template's name or UUID"),
                  Field("version", int | None, minimum=1,
                        description="the template version; default: its latest"),
                  Field("student", str | None, description="whom the session is for "
                        "(admins, teachers where the policy allows); default: the caller"))
SESSION_FILTERS = (Field("student", str, description="a student's name (ignored for "
                         "students: they see their own)"),
                   Field("template", str, description="a template's name or UUID"),
                   Field("state", str, enum=(*LIVE, SESSION_DELETED),
                         description="default: every state but deleted"))
START = obj("where to start a session", Field("seat", str, required=True,
                                              description="the seat's node name or UUID"),
            Field("boot", bool, default=True, description="power the seat on (or reboot "
                  "it) so it boots the session; false for a seat in iPXE's menu already"))
SAVE = obj("a save point", Field("label", str, required=True, max_length=255,
                                 description="a name for it; labels may repeat"))
REVERT = obj("the save point to go back to", Field(
    "save", str | int, required=True,
    description="its UUID, number or label (the latest save with that label)"))


def mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


# -- the storage backend of this process ------------------------------------------------
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
        script, with the CHAP account, just went there: api/boot.py). Raises ApiError if
        this process does not serve the session, or its target server refuses."""
        if not self.lock.acquire(timeout=30):
            raise ApiError(503, "the session store is busy; ask again")
        try:
            if self._backend is None or not self._backend.is_exported(session_uuid):
                raise conflict(f"Session {session_uuid} is not served by this process")
            try:
                self._backend.admit_only(session_uuid, address)
            except OverlayError as error:
                raise backend_error(error) from None
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
                except (ApiError, OverlayError) as error:
                    LOG.warning("ending session %s: %s", uuid, error)

    def _backend_sessions(self) -> list[str]:
        with self.db.read() as session:
            return list(session.scalars(select(StudentSession.uuid).where(
                StudentSession.state == SESSION_RUNNING, StudentSession.backend == self.name)))

    def end(self, session_uuid: str, why: str) -> None:
        """Remove the session's target (its seat can no longer reach the disk) and mark it
        stopped; its data stays."""
        with self.backend() as backend:
            backend.unexport(session_uuid)
            if backend.is_exported(session_uuid):
                raise ApiError(500, f"Session {session_uuid}'s iSCSI target could not be "
                                    "removed; see the API log")
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
                .where(StudentSession.state.in_(BUSY),
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
                except (ApiError, OverlayError) as error:
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


_storage_lock = threading.Lock()


def storage() -> Storage:
    extensions = current_app.extensions
    with _storage_lock:
        if "labmetal.storage" not in extensions:
            svc = services()
            extensions["labmetal.storage"] = Storage(svc.settings.session_store, svc.db)
        return extensions["labmetal.storage"]


def backend_error(error: OverlayError) -> ApiError:
    return ApiError(STATUS.get(error.reason, 500), str(error))


@contextmanager
def backend_call() -> Iterator[OverlayBackend]:
    """The backend for one step; its refusals and failures as API errors."""
    try:
        with storage().backend() as backend:
            yield backend
    except OverlayError as error:
        LOG.warning("session store: %s", error)
        raise backend_error(error) from None


# -- views -------------------------------------------------------------------------------
def version_view(version: TemplateVersion) -> dict[str, Any]:
    return {"version": version.version, "image": version.image_name,
            "backend": version.backend, "backend_key": version.backend_key,
            "size": version.size, "description": version.description,
            # its own kernel and initrd were found: Secure Boot seats boot its sessions too
            "secure_boot": version.boot_kernel is not None,
            "created_by": version.created_by, "created_at": isotime(version.created_at)}


def boot_files_of(key: str, version: int, image: Image) -> dict[str, str | None]:
    """The frozen version's own boot files for Secure Boot seats (images/boot_files.py),
    as TemplateVersion's columns; all None if the image has none."""
    store = image_store()
    found = boot_files.register(services().db, store, store.raw_path(image.uuid),
                                f"{key}-v{version}")
    if found is None:
        return {"boot_kernel": None, "boot_initrd": None, "boot_root_uuid": None}
    return {"boot_kernel": found.kernel, "boot_initrd": found.initrd,
            "boot_root_uuid": found.root_uuid}


def template_view(template: Template) -> dict[str, Any]:
    versions = template.versions
    return {"uuid": template.uuid, "name": template.name,
            "description": template.description, "owner": template.owner,
            "latest_version": versions[-1].version if versions else None,
            "versions": [version_view(v) for v in versions],
            "created_at": isotime(template.created_at), "links": links("templates",
                                                                        template.name)}


def session_view(ses: StudentSession) -> dict[str, Any]:
    version = ses.template_version
    running = ses.state == SESSION_RUNNING
    return {"uuid": ses.uuid, "student": ses.user.name, "template": version.template.name,
            "template_version": version.version, "backend": ses.backend, "state": ses.state,
            "seat": (ses.seat.name or ses.seat.uuid) if ses.seat is not None else None,
            "target": {"iqn": ses.target_iqn, "portal": ses.target_portal, "lun": 1}
            if running else None,
            "used_bytes": ses.used_bytes, "used_mib": round(ses.used_bytes / MiB, 1),
            "size": version.size, "last_saved_at": isotime(ses.last_saved_at),
            "started_at": isotime(ses.started_at), "last_error": ses.last_error,
            "created_by": ses.created_by, "created_at": isotime(ses.created_at),
            "links": links("sessions", ses.uuid)}


def save_view(save: SessionSave, session_uuid: str) -> dict[str, Any]:
    return {"uuid": save.uuid, "session": session_uuid, "number": save.number,
            "label": save.label, "save_id": save.backend_save_id,
            "created_by": save.created_by, "created_at": isotime(save.created_at)}


# -- lookups -----------------------------------------------------------------------------
def find_template(session: Session, ident: str) -> Template:
    column = Template.uuid if is_uuid(ident) else Template.name
    template = session.scalar(select(Template).where(column == ident.lower()))
    if template is None:
        raise not_found(f"Template {ident} could not be found.")
    return template


def find_session(session: Session, ident: str) -> StudentSession:
    ses = session.scalar(select(StudentSession).where(StudentSession.uuid == ident.lower())) \
        if is_uuid(ident) else None
    if ses is None or ses.state == SESSION_DELETED:
        raise not_found(f"Session {ident} could not be found.")
    return ses


def session_owner(ident: str) -> str | None:
    """The student a session belongs to (the policy's owner of ``session:*``)."""
    if not is_uuid(ident):
        return None
    with services().db.read() as session:
        return session.scalar(select(User.name).join(StudentSession,
                                                     StudentSession.user_id == User.id)
                              .where(StudentSession.uuid == ident.lower()))


def new_session_owner() -> str | None:
    """Whom a new session is for: the student named in the body, else the caller."""
    body = request.get_json(silent=True)
    student = body.get("student") if isinstance(body, dict) else None
    return student if isinstance(student, str) else g.caller.name


def template_image(session: Session, ident: Any) -> Image:
    if not isinstance(ident, str):
        raise bad_request("Mandatory field missing: image (a whole-disk image's name or UUID)")
    try:
        return usable_image(session, ident, ("whole-disk",))
    except ImageUnusable as error:
        if error.problem == WRONG_KIND:
            raise bad_request(f"Image {error.name} is a {error.kind} image: a template is "
                              "made from a whole-disk image") from None
        if error.problem == NOT_ACTIVE:
            raise bad_request(f"Image {error.name} has no data yet (status {error.status}); "
                              "upload it first") from None
        raise not_found(f"Image {ident} could not be found.") from None


def refresh_used(backend: OverlayBackend, ses: StudentSession) -> None:
    try:
        ses.used_bytes = backend.used_bytes(ses.uuid)
    except OverlayError as error:
        LOG.warning("cannot measure session %s: %s", ses.uuid, error)


# -- templates ---------------------------------------------------------------------------
@blueprint.get("/v1/templates")
@authorize("template:get")
def list_templates():
    with services().db.read() as session:
        templates = session.scalars(select(Template).order_by(Template.name)).all()
        return {"templates": [template_view(t) for t in templates]}


@blueprint.get("/v1/templates/<ident>")
@authorize("template:get")
def show_template(ident: str):
    with services().db.read() as session:
        return template_view(find_template(session, ident))


@blueprint.post("/v1/templates")
@authorize("template:create")
@body(NEW_TEMPLATE)
def create_template(body: dict[str, Any]):
    """A template from an active whole-disk image: version 1, frozen in the backend."""
    name, description = body["name"], body.get("description")
    svc = services()
    with svc.db.read() as session:
        if session.scalar(select(Template.id).where(Template.name == name)):
            raise conflict(f"A template named {name} already exists; add a version to it.")
        image = template_image(session, body.get("image"))
    template_uuid = new_uuid()
    key = f"{name}-{template_uuid[:8]}"
    with backend_call() as backend:
        frozen = backend.make_template(key, 1, image_store().raw_path(image.uuid))
        booted = boot_files_of(key, 1, image)
        try:
            with svc.db.write() as session:
                template = Template(uuid=template_uuid, name=name, description=description,
                                    owner=g.caller.name)
                session.add(template)
                session.flush()
                session.add(TemplateVersion(template_id=template.id, version=1,
                                            image_id=image.id, image_name=image.name,
                                            backend=backend.name, backend_key=key,
                                            size=frozen.size, created_by=g.caller.name,
                                            **booted))
                session.flush()
                session.refresh(template)
                view = template_view(template)
        except IntegrityError:
            raise conflict(f"A template named {name} already exists.") from None
    LOG.info("template %s version 1 made from image %s by %s", name, image.name,
             g.caller.name)
    return view, 201, {"Location": view["links"][0]["href"]}


@blueprint.post("/v1/templates/<ident>/versions")
@authorize("template:update")
@body(NEW_VERSION)
def add_template_version(ident: str, body: dict[str, Any]):
    """A new frozen version; the sessions made from older ones do not change."""
    description = body.get("description")
    svc = services()
    with svc.db.read() as session:
        template = find_template(session, ident)
        image = template_image(session, body.get("image"))
        key = template.versions[0].backend_key if template.versions \
            else f"{template.name}-{template.uuid[:8]}"
    with backend_call() as backend:  # the lock also keeps version numbers in turn
        with svc.db.read() as session:
            number = 1 + max((v.version for v in find_template(session, ident).versions),
                             default=0)
        frozen = backend.make_template(key, number, image_store().raw_path(image.uuid))
        booted = boot_files_of(key, number, image)
        with svc.db.write() as session:
            template = find_template(session, ident)
            session.add(TemplateVersion(template_id=template.id, version=number,
                                        image_id=image.id, image_name=image.name,
                                        backend=backend.name, backend_key=key,
                                        size=frozen.size, description=description,
                                        created_by=g.caller.name, **booted))
            template.updated_at = utcnow()
            session.flush()
            session.refresh(template)
            view = template_view(template)
    LOG.info("template %s version %d made from image %s by %s", template.name, number,
             image.name, g.caller.name)
    return view, 201


@blueprint.delete("/v1/templates/<ident>")
@authorize("template:delete")
def delete_template(ident: str):
    with services().db.write() as session:
        template = find_template(session, ident)
        version_ids = [v.id for v in template.versions]
        live = session.scalars(select(StudentSession.uuid).where(
            StudentSession.template_version_id.in_(version_ids),
            StudentSession.state != SESSION_DELETED)).all()
        if live:
            raise conflict(f"Template {template.name} has {len(live)} session(s); delete "
                           "them first.")
        session.execute(delete(StudentSession).where(
            StudentSession.template_version_id.in_(version_ids)))
        session.delete(template)
    LOG.info("template %s deleted", template.name)
    return "", 204


# -- sessions ----------------------------------------------------------------------------
@blueprint.get("/v1/sessions")
@authorize("session:get", lists_own=True)
@query(*SESSION_FILTERS)
def list_sessions(query: dict[str, Any]):
    """Students see their own only. Filters: ``student``, ``template``, ``state``
    (``deleted`` ones are listed only when asked for)."""
    storage().reconcile()
    statement = select(StudentSession).join(User, User.id == StudentSession.user_id)
    student = g.caller.name if g.as_owner else query.get("student")
    if student:
        statement = statement.where(User.name == student)
    state = query.get("state")
    if state:
        statement = statement.where(StudentSession.state == state)
    else:
        statement = statement.where(StudentSession.state != SESSION_DELETED)
    with services().db.read() as session:
        template = query.get("template")
        if template:
            versions = [v.id for v in find_template(session, template).versions]
            statement = statement.where(StudentSession.template_version_id.in_(versions))
        rows = session.scalars(statement.order_by(User.name, StudentSession.created_at)).all()
        return {"sessions": [session_view(ses) for ses in rows]}


@blueprint.get("/v1/sessions/<ident>")
@authorize("session:get", owner=session_owner)
def show_session(ident: str):
    storage().reconcile()
    with services().db.read() as session:
        return session_view(find_session(session, ident))


@blueprint.post("/v1/sessions")
@authorize("session:create", owner=new_session_owner)
@body(NEW_SESSION)
def create_session(body: dict[str, Any]):
    """A new session of the template (its latest version by default) for the caller, or
    for the student named (admins; teachers where the policy allows). One live session per
    student and template."""
    student_name = new_session_owner()
    if not student_name:
        raise bad_request("Mandatory field missing: student (the user the session is for)")
    view = new_session(body["template"], student_name, body.get("version"))
    return view, 201, {"Location": view["links"][0]["href"]}


def new_session(template_ident: str, student_name: str,
                version_number: int | None = None) -> dict[str, Any]:
    """Make the student's session of the template (the caller is allowed to); its view."""
    svc = services()
    with svc.db.read() as session:
        template = find_template(session, template_ident)
        student = session.scalar(select(User).where(User.name == student_name))
        if student is None or student.disabled:
            raise bad_request(f"No user {student_name} (field: student)")
        versions = {v.version: v for v in template.versions}
        if not versions:
            raise conflict(f"Template {template.name} has no version yet.")
        version = versions.get(version_number or max(versions))
        if version is None:
            raise not_found(f"Template {template.name} has no version {version_number} "
                            f"(versions: {', '.join(map(str, sorted(versions)))})")
        if version.backend != storage().name:
            raise conflict(f"Template {template.name} version {version.version} is kept by "
                           f"the {version.backend} store, and sessions are made in the "
                           f"{storage().name} store (overlay_backend)")
        existing = session.scalar(select(StudentSession.uuid).where(
            StudentSession.user_id == student.id, StudentSession.state.in_(LIVE),
            StudentSession.template_version_id.in_([v.id for v in template.versions])))
        if existing:
            raise conflict(f"{student.name} already has a session of template "
                           f"{template.name}: {existing}; start it, or delete it first")
    session_uuid = new_uuid()
    with backend_call() as backend:
        check_class_quota(backend, template.id, f"cannot create a session of {template.name}")
        disk = backend.create_session(session_uuid, version.backend_key, version.version)
        try:
            with svc.db.write() as session:
                if session.scalar(select(StudentSession.uuid).where(  # a racing request's
                        StudentSession.user_id == student.id, StudentSession.state.in_(LIVE),
                        StudentSession.template_version_id.in_(
                            [v.id for v in template.versions]))):
                    raise conflict(f"{student.name} already has a session of template "
                                   f"{template.name}")
                ses = StudentSession(
                    uuid=session_uuid, user_id=student.id, template_version_id=version.id,
                    backend=backend.name, state=SESSION_STOPPED, used_bytes=disk.used_bytes,
                    chap_user=f"lm{session_uuid.replace('-', '')[:16]}",
                    chap_secret=svc.box.seal(chap_secret()), created_by=g.caller.name)
                session.add(ses)
                session.flush()
                view = session_view(ses)
        except Exception:
            try:  # nothing of it is kept if it is not recorded
                backend.delete(session_uuid)
            except OverlayError as error:
                LOG.warning("removing unrecorded session %s: %s", session_uuid, error)
            raise
    LOG.info("session %s of template %s version %d created for %s by %s", session_uuid,
             template.name, version.version, student.name, g.caller.name)
    return view


def chap_secret() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


def check_class_quota(backend: OverlayBackend, template_id: int, what: str) -> None:
    """Every live session of the template together under ``class_quota_mib``."""
    limit = services().settings.class_quota_mib * MiB
    if not limit:
        return
    with services().db.read() as session:
        name = session.scalar(select(Template.name).where(Template.id == template_id))
        rows = session.execute(
            select(StudentSession.uuid, StudentSession.state, StudentSession.used_bytes)
            .join(TemplateVersion, TemplateVersion.id == StudentSession.template_version_id)
            .where(TemplateVersion.template_id == template_id,
                   StudentSession.state.in_(LIVE))).all()
    used = 0
    for uuid, state, stored in rows:
        used += backend.used_bytes(uuid) if state == SESSION_RUNNING else stored
    if used >= limit:
        raise OverlayError(f"{what}: the sessions of template {name} use "
                           f"{mib(used)} of their class quota of {mib(limit)} "
                           "(class_quota_mib); a teacher can reset or delete some",
                           Reason.QUOTA)


@blueprint.delete("/v1/sessions/<ident>")
@authorize("session:delete", owner=session_owner)
def delete_session(ident: str):
    svc = services()
    with svc.db.read() as session:
        ses = find_session(session, ident)
        refuse_if_busy(ses, "deleted")
    with backend_call() as backend:
        try:
            backend.delete(ses.uuid)
        except OverlayError as error:
            if error.reason is not Reason.NOT_FOUND:
                raise
        with svc.db.write() as session:
            ses = find_session(session, ident)
            ses.state = SESSION_DELETED
            ses.used_bytes = 0
            session.execute(delete(SessionSave).where(SessionSave.session_id == ses.id))
    LOG.info("session %s deleted by %s", ses.uuid, g.caller.name)
    return "", 204


def refuse_if_busy(ses: StudentSession, what: str) -> None:
    if ses.state in BUSY:
        seat = (ses.seat.name or ses.seat.uuid) if ses.seat is not None else "?"
        raise conflict(f"Session {ses.uuid} is {ses.state} on seat {seat} and cannot be "
                       f"{what}; stop it first (power off or log out)")


@blueprint.post("/v1/sessions/<ident>/start")
@authorize("session:resume", owner=session_owner)
@body(START)
def start_session(ident: str, body: dict[str, Any]):
    """Export the session to that seat alone (its initiator name
    ``iqn.2026-11.org.labmetal:<node uuid>`` and the session's CHAP account), then power
    the seat on (or reboot it) so its iPXE script sanboots the session's disk. ``"boot":
    false`` for a seat someone powers on by hand, or one that is in iPXE already."""
    return start_on_seat(ident, body["seat"], body["boot"])


def start_on_seat(ident: str, seat_ident: str, boot: bool) -> dict[str, Any]:
    """Export the session to the seat (the caller is allowed to), boot the seat if asked;
    the session's view."""
    svc = services()
    store = storage()
    store.reconcile()
    with svc.db.read() as session:
        session_uuid = find_session(session, ident).uuid
    store.starting.add(session_uuid)
    try:
        with svc.db.write() as session:
            ses = find_session(session, ident)
            node = find_node(session, seat_ident)
            if ses.state in BUSY:
                seat = (ses.seat.name or ses.seat.uuid) if ses.seat is not None else "?"
                raise conflict(f"Session {ses.uuid} is already {ses.state} on seat {seat}; "
                               "one seat at a time: stop it there first")
            other = session.scalar(select(StudentSession.uuid).where(
                StudentSession.seat_node_id == node.id, StudentSession.state.in_(BUSY)))
            if other:
                raise conflict(f"Seat {node.name or node.uuid} is in use by another session")
            check_seat(session, node)
            previous = ses.state
            ses.state, ses.seat_node_id = SESSION_STARTING, node.id
            seat_name, seat_uuid = node.name or node.uuid, node.uuid
            template_id = ses.template_version.template_id
            # A new CHAP secret at each start: one read from a seat's boot script while
            # the session ran is worth nothing once it ended.
            chap_user, secret = ses.chap_user, chap_secret()
            ses.chap_secret = svc.box.seal(secret)
            ses.seat_address = None  # the next boot script binds it (api/boot.py)
        try:
            with backend_call() as backend:
                check_class_quota(backend, template_id,
                                  f"cannot start session {session_uuid}")
                export = backend.export(session_uuid, session_iqn(session_uuid), chap_user,
                                        secret, [seat_iqn(seat_uuid)])
                used = backend.used_bytes(session_uuid)
        except Exception as error:
            message = error.message if isinstance(error, ApiError) \
                else f"{type(error).__name__}, see the API log"
            with svc.db.write() as session:  # as it was: the session did not start
                ses = find_session(session, ident)
                ses.state, ses.seat_node_id = previous, None
                ses.last_error = f"Starting on seat {seat_name} failed: {message}"
            raise
        with svc.db.write() as session:
            ses = find_session(session, ident)
            ses.state, ses.started_at, ses.last_error = SESSION_RUNNING, utcnow(), None
            ses.target_iqn, ses.target_portal, ses.used_bytes = export.iqn, export.portal, used
            session.flush()
            view = session_view(ses)
    finally:
        store.starting.discard(session_uuid)
    LOG.info("session %s running on seat %s (%s)", session_uuid, seat_name, export.iqn)
    if boot:
        why_not = boot_seat(seat_uuid, f"to boot session {session_uuid}")
        if why_not:
            with svc.db.write() as session:
                ses = find_session(session, ident)
                ses.last_error = f"Session running, but seat {seat_name} was not booted: " \
                                 f"{why_not}; power it on by hand"
                session.flush()
                view = session_view(ses)
    return view


def check_seat(session: Session, node: Node) -> None:
    """May the caller start a session on this node? Starting one powers the node on or
    reboots it (or makes its next boot the session's), so a caller who may not power nodes
    (``node:set_power_state``: students, by default) may start only on a seat of a room,
    and only one that is not in maintenance nor in the middle of a provisioning action.
    Nobody starts a session on a node that boots labmetal's ramdisk (deploy, clean,
    inspect, capture)."""
    name = node.name or node.uuid
    if node.provision_state in states.RAMDISK_MODE:
        raise conflict(f"Seat {name} is {node.provision_state}: it boots labmetal's ramdisk "
                       "until that is done")
    if services().policy.verdict("node:set_power_state", g.caller.role) is Verdict.ALLOWED:
        return
    if session.scalar(select(Seat.id).where(Seat.node_id == node.id)) is None:
        raise ApiError(403, f"Node {name} is not a seat of a room: a session starts on a "
                            "room's seat")
    if node.maintenance:
        raise conflict(f"Seat {name} is in maintenance; ask a teacher or an admin")
    if node.target_provision_state is not None:
        raise conflict(f"Seat {name} is {node.provision_state} (to "
                       f"{node.target_provision_state}); try again when that is done")


def boot_seat(node_uuid: str, reason: str) -> str | None:
    """Ask the seat's conductor to power it on, or to reboot it if it is on (its next boot
    script is what it boots); why not, if it cannot be asked."""
    svc = services()
    with svc.db.read() as session:
        node = find_node(session, node_uuid)
    try:
        svc.door.boot(node, reason, Asker(user=caller_name()))
    except Refused as error:
        return error.message
    return None


@blueprint.post("/v1/sessions/<ident>/stop")
@authorize("session:resume", owner=session_owner)
def stop_session(ident: str):
    """The seat is done with it (powered off, logged out): its target goes, the data
    stays in the session."""
    with services().db.read() as session:
        ses = find_session(session, ident)
    if ses.state == SESSION_STARTING:
        raise conflict(f"Session {ses.uuid} is being started; try again in a moment")
    if ses.state != SESSION_STOPPED:
        storage().end(ses.uuid, f"stopped by {g.caller.name}")
    with services().db.read() as session:
        return session_view(find_session(session, ident))


@blueprint.post("/v1/sessions/<ident>/save")
@authorize("session:save", owner=session_owner)
@body(SAVE)
def save_session(ident: str, body: dict[str, Any]):
    """A save point (running or not: what the seat wrote is flushed first)."""
    label = body["label"]
    svc = services()
    with svc.db.read() as session:
        ses = find_session(session, ident)
        if ses.state == SESSION_STARTING:
            raise conflict(f"Session {ses.uuid} is being started; try again in a moment")
    with backend_call() as backend:
        point = backend.save(ses.uuid, label)
        with svc.db.write() as session:
            ses = find_session(session, ident)
            created = point.created_at.astimezone(UTC).replace(tzinfo=None)
            save = SessionSave(session_id=ses.id, number=point.number, label=label,
                               backend_save_id=point.save_id, created_by=g.caller.name,
                               created_at=created)
            session.add(save)
            ses.last_saved_at = utcnow()
            refresh_used(backend, ses)
            session.flush()
            view = save_view(save, ses.uuid)
    LOG.info("session %s saved as %s by %s", ses.uuid, point.save_id, g.caller.name)
    return view, 201


@blueprint.get("/v1/sessions/<ident>/saves")
@authorize("session:get", owner=session_owner)
def list_saves(ident: str):
    with services().db.read() as session:
        ses = find_session(session, ident)
        return {"saves": [save_view(save, ses.uuid) for save in ses.saves]}


@blueprint.post("/v1/sessions/<ident>/revert")
@authorize("session:reset", owner=session_owner)
@body(REVERT)
def revert_session(ident: str, body: dict[str, Any]):
    """Back to that save point; the changes since are lost, later save points stay."""
    wanted = body["save"]
    svc = services()
    with svc.db.read() as session:
        ses = find_session(session, ident)
        refuse_if_busy(ses, "reverted")
        matches = [s for s in ses.saves if str(wanted) in (s.uuid, str(s.number), s.label,
                                                           s.backend_save_id)]
        if not matches:
            raise not_found(f"Session {ses.uuid} has no save point {wanted}")
        save = matches[-1]
    with backend_call() as backend:
        backend.revert(ses.uuid, save.backend_save_id)
        with svc.db.write() as session:
            ses = find_session(session, ident)
            ses.last_error = None
            refresh_used(backend, ses)
            session.flush()
            view = session_view(ses)
    LOG.info("session %s reverted to %s by %s", ses.uuid, save.backend_save_id,
             g.caller.name)
    return view


@blueprint.post("/v1/sessions/<ident>/reset")
@authorize("session:reset", owner=session_owner)
def reset_session(ident: str):
    """Back to its template version: the session's changes and save points go."""
    svc = services()
    with svc.db.read() as session:
        ses = find_session(session, ident)
        refuse_if_busy(ses, "reset")
    with backend_call() as backend:
        backend.reset(ses.uuid)
        with svc.db.write() as session:
            ses = find_session(session, ident)
            session.execute(delete(SessionSave).where(SessionSave.session_id == ses.id))
            ses.last_saved_at = ses.last_error = None
            refresh_used(backend, ses)
            session.flush()
            view = session_view(ses)
    LOG.info("session %s reset to its template by %s", ses.uuid, g.caller.name)
    return view
