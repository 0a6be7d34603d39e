"""/v1/templates and /v1/sessions: teachers' TP templates (frozen versions of a disk image)
and students' sessions of them, each a copy-on-write disk that a seat boots over iSCSI
(DESIGN §5, issue 7).

These views authorize and render; what a session may do is decided by the door to sessions
(conductor/session_door.py), over the session store (conductor/session_store.py: the
storage backend, ``local`` qcow2 overlays or ``ceph`` RBD clones, and the iSCSI target
server it starts), one per API process, made on first use, used under one lock, closed
when the process exits. So ``running`` in the database means "exported by this process": a
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

import logging
import re
from typing import Any

from flask import Blueprint, g, request
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import asker, isotime, links
from labmetal.names import is_uuid
from labmetal.api.errors import bad_request, conflict, not_found
from labmetal.api.images import image_store
from labmetal.api.validation import Field, body, obj, query
from labmetal.lookup import find_session, find_template
from labmetal.conductor.session_store import Storage
from labmetal.images import boot_files, session_boot
from labmetal.lifecycles import (SESSION_BUSY, SESSION_DELETED, SESSION_LIVE,
                                 SESSION_RUNNING)
from labmetal.lookup import NOT_ACTIVE, WRONG_KIND, ImageUnusable, usable_image
from labmetal.models import (Image, SessionSave, StudentSession, Template,
                             TemplateVersion, User, new_uuid, utcnow)
from labmetal.policy import Verdict

LOG = logging.getLogger(__name__)
blueprint = Blueprint("sessions", __name__)

MiB = 2**20
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,53}")  # + "-" + 8 = the backend's 63
LIVE = SESSION_LIVE  # not deleted
BUSY = SESSION_BUSY


_DESCRIPTION = Field("description", str | None, description="free text, for people")
_IMAGE = Field("image", str, required=True, description="an active whole-disk image's name "
               "or UUID, frozen into the version")
_MODE = Field("session_mode", str, enum=("auto", "local", "iscsi"),
              description="how its sessions run: local (from the seat's disk, the template's "
                          "own kernel), iscsi (diskless), auto (local where it can boot "
                          "that way); default auto")
NEW_TEMPLATE = obj("a template", Field(
    "name", str, required=True, pattern=f"^{TEMPLATE_NAME.pattern}$", example="net-tp",
    error="Invalid template name {value!r}: 1-54 lower-case letters, digits and '-', "
          "starting with a letter or digit"), _IMAGE, _DESCRIPTION, _MODE)
NEW_VERSION = obj("a template version", _IMAGE, _DESCRIPTION)
TEMPLATE_CHANGE = obj("a change of a template", _MODE, _DESCRIPTION)
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


def storage() -> Storage:
    """This process's session store (conductor/session_store.py)."""
    return services().session_store


# -- views -------------------------------------------------------------------------------
def version_view(version: TemplateVersion) -> dict[str, Any]:
    return {"version": version.version, "image": version.image_name,
            "backend": version.backend, "backend_key": version.backend_key,
            "size": version.size, "description": version.description,
            # its own kernel and initrd were found: Secure Boot seats boot its sessions too
            "secure_boot": version.boot_kernel is not None,
            # its sessions can run from the seat's disk (issue 16); if not, why
            "local": version.session_kernel is not None,
            "local_error": version.local_boot_error,
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


def local_boot_of(key: str, version: int, image: Image) -> dict[str, Any]:
    """The frozen version's local-session boot (images/session_boot.py), as
    TemplateVersion's columns."""
    store = image_store()
    return session_boot.register(services().db, store, store.raw_path(image.uuid),
                                 f"{key}-v{version}")


def template_view(template: Template) -> dict[str, Any]:
    versions = template.versions
    return {"uuid": template.uuid, "name": template.name,
            "description": template.description, "owner": template.owner,
            "session_mode": template.session_mode,
            "latest_version": versions[-1].version if versions else None,
            "versions": [version_view(v) for v in versions],
            "created_at": isotime(template.created_at), "links": links("templates",
                                                                        template.name)}


def session_view(ses: StudentSession) -> dict[str, Any]:
    version = ses.template_version
    running = ses.state == SESSION_RUNNING
    return {"uuid": ses.uuid, "student": ses.user.name, "template": version.template.name,
            "template_version": version.version, "backend": ses.backend, "state": ses.state,
            "mode": ses.mode, "synced_at": isotime(ses.synced_at),
            "seat": (ses.seat.name or ses.seat.uuid) if ses.seat is not None else None,
            "target": {"iqn": ses.target_iqn, "portal": ses.target_portal, "lun": 1}
            if running and ses.mode == "iscsi" else None,
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
    with services().sessions.backend() as backend:
        frozen = backend.make_template(key, 1, image_store().raw_path(image.uuid))
        booted = {**boot_files_of(key, 1, image), **local_boot_of(key, 1, image)}
        try:
            with svc.db.write() as session:
                template = Template(uuid=template_uuid, name=name, description=description,
                                    owner=g.caller.name,
                                    session_mode=body.get("session_mode") or "auto")
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


@blueprint.patch("/v1/templates/<ident>")
@authorize("template:update")
@body(TEMPLATE_CHANGE)
def change_template(ident: str, body: dict[str, Any]):
    """Its sessions' mode or its description; the next start of each session follows."""
    with services().db.write() as session:
        template = find_template(session, ident)
        if body.get("session_mode"):
            template.session_mode = body["session_mode"]
        if "description" in body:
            template.description = body["description"]
        session.flush()
        return template_view(template)


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
    with services().sessions.backend() as backend:  # the lock also keeps version numbers in turn
        with svc.db.read() as session:
            number = 1 + max((v.version for v in find_template(session, ident).versions),
                             default=0)
        frozen = backend.make_template(key, number, image_store().raw_path(image.uuid))
        booted = {**boot_files_of(key, number, image), **local_boot_of(key, number, image)}
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
    return _view(services().sessions.create(template_ident, student_name, version_number,
                                            asker()))


def _view(ident: str) -> dict[str, Any]:
    with services().db.read() as session:
        return session_view(find_session(session, ident))


@blueprint.delete("/v1/sessions/<ident>")
@authorize("session:delete", owner=session_owner)
def delete_session(ident: str):
    services().sessions.delete(ident, asker())
    return "", 204


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
    may_power = svc.policy.verdict("node:set_power_state", g.caller.role) is Verdict.ALLOWED
    session_uuid = svc.sessions.start(ident, seat_ident, asker(), may_power)
    if boot:
        svc.sessions.boot_on(session_uuid, asker())
    return _view(session_uuid)


def boot_seat(node_uuid: str, reason: str) -> str | None:
    """Ask the seat's conductor to power it on, or to reboot it if it is on (its next boot
    script is what it boots); why not, if it cannot be asked."""
    return services().sessions.boot_seat(node_uuid, reason, asker())


@blueprint.post("/v1/sessions/<ident>/stop")
@authorize("session:resume", owner=session_owner)
def stop_session(ident: str):
    """The seat is done with it (powered off, logged out): its target goes, the data
    stays in the session."""
    services().sessions.stop(ident, asker())
    return _view(ident)


@blueprint.post("/v1/sessions/<ident>/save")
@authorize("session:save", owner=session_owner)
@body(SAVE)
def save_session(ident: str, body: dict[str, Any]):
    """A save point (running or not: what the seat wrote is flushed first)."""
    save_uuid = services().sessions.save(ident, body["label"], asker())
    if save_uuid is None:
        return {"queued": body["label"], "message": "the session runs from its seat's disk: "
                "the save point is made when the seat next uploads it (when the session "
                "ends)"}, 202
    with services().db.read() as session:
        ses = find_session(session, ident)
        save = session.scalar(select(SessionSave).where(SessionSave.uuid == save_uuid))
        assert save is not None  # just made; a session's saves go only with a reset
        return save_view(save, ses.uuid), 201


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
    services().sessions.revert(ident, str(body["save"]), asker())
    return _view(ident)


@blueprint.post("/v1/sessions/<ident>/reset")
@authorize("session:reset", owner=session_owner)
def reset_session(ident: str):
    """Back to its template version: the session's changes and save points go."""
    services().sessions.reset(ident, asker())
    return _view(ident)
