"""A student at a seat logs in to their TP session, from labmetal's ramdisk, over HTTPS.

The seat's iPXE menu (api/boot.py) offers a login. Choosing it boots labmetal's ramdisk in
``login`` mode (``/boot/<mac>/login.ipxe``: public, it holds nothing secret). The ramdisk
asks for a user name and a password on the seat's screen and sends them here over HTTPS,
checking the server against labmetal's CA, whose fingerprint came on its kernel command
line (agent/seat_login.py). No password crosses the seat network in clear (DESIGN §11):
Debian's iPXE, which asked for it before, has no TLS, and plain HTTP (the front refuses
credentials there, labmetal/front.py) carries only what is public.

The login answers with the student's sessions (not running elsewhere), each with its
newest save points, and the templates they have none of yet; in a room open for a TP, with
nothing to choose: that TP's session starts at once. The seat pages and searches the list
itself (agent/seat_login.py): the answer is bounded (``MAX_CHOICES`` TPs, ``MAX_SAVES``
save points each, labels cut), whatever the student made through the REST API. A choice
comes back with the login's ticket (made for this user and seat, for ten minutes), one of:

- ``s-<session uuid>``: resume the session;
- ``v-<session uuid>-<save number>``: go back to that save point, then resume;
- ``r-<session uuid>``: start the TP over from its template version (its changes and save
  points go), then resume;
- ``t-<template>``: begin a new session of the template.

Starting a session only marks it running on this seat; the ramdisk then reboots the seat,
whose next boot script (api/boot.py) sanboots the session's disk.

The credentials are checked like any API caller's (labmetal's users, LDAP; slowed per user
and address), the choices by the same policy actions as ``POST /v1/sessions`` and
``/v1/sessions/<id>/start`` (``session:reset`` too for going back to a save point or to
the template, as ``/v1/sessions/<id>/revert`` and ``/reset``; the door refuses a session
busy on a seat), and the caller must hold the seat's DHCP lease where labmetal
knows it: a login for a seat is made at that seat.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, g
from sqlalchemy import select

from labmetal import states
from labmetal.api.services import services
from labmetal.api.auth import Caller, public
from labmetal.api.common import asker, isotime
from labmetal.api.boot import ipxe_response, login_ramdisk
from labmetal.api.errors import ApiError, conflict, error_response, not_found
from labmetal.api.seat_address import caller_address, holds_lease, leases_known
from labmetal.api.sessions import BUSY, LIVE, new_session, session_owner, start_on_seat
from labmetal.api.validation import Field, body, obj, produces
from labmetal.models import (Node, Port, Room, Seat, SessionSave, StudentSession, Template,
                             TemplateVersion, User)
from labmetal.policy import Verdict
from labmetal.pxe.ipxe import IdleScript, script_mac

blueprint = Blueprint("seat_login", __name__)
REALM = 'Basic realm="labmetal seat login"'
CHOICE = re.compile(r"[stvr]-[A-Za-z0-9-]{1,80}")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_REVERT = re.compile(rf"v-({_UUID})-([0-9]{{1,9}})")
_RESET = re.compile(rf"r-({_UUID})")
TICKET_SECONDS = 600
MAX_CHOICES = 300  # TPs in one answer; the seat shows them 9 a page
MAX_SAVES = 12  # the newest save points of each session
MAX_LABEL = 48  # characters of a save point's label
START = obj("a choice of the seat's login menu",
            Field("choice", str, required=True, pattern=CHOICE.pattern, max_length=82,
                  example="s-5d2f0c1e-0000-4000-8000-000000000001",
                  description="s-<session uuid> resumes a session, v-<session uuid>-<save "
                              "number> goes back to a save point and r-<session uuid> to the "
                              "template before resuming, t-<template> begins one"),
            Field("ticket", str, required=True, pattern=r"^[0-9]{1,12}\.[0-9a-f]{64}$",
                  max_length=77, example=f"1800000000.{'0' * 64}",
                  description="the login's, made for this user and seat, for ten minutes"))


@dataclass(frozen=True)
class Choice:
    """A menu choice, parsed: ``kind`` is resume, revert, reset or new; ``ident`` the
    session's UUID (the template's name for new); ``save`` the save point's number."""
    kind: str
    ident: str
    save: int | None = None


def parse_choice(text: str) -> Choice:
    """The choice a seat sent (already matched by ``CHOICE``); a 400 if it is not one."""
    if text.startswith("s-"):
        return Choice("resume", text[2:])
    if text.startswith("t-"):
        return Choice("new", text[2:])
    revert = _REVERT.fullmatch(text)
    if revert:
        return Choice("revert", revert.group(1), int(revert.group(2)))
    reset = _RESET.fullmatch(text)
    if reset:
        return Choice("reset", reset.group(1))
    raise ApiError(400, f"not a choice of this menu: {text[:82]!r} (v-<session uuid>-<save "
                        "number>, r-<session uuid>)")


def ticket(user: str, mac: str, expires: int | None = None) -> str:
    expires = expires or int(time.time()) + TICKET_SECONDS
    key = services().box.derive("seat login tickets")
    digest = hmac.new(key, f"{user}\0{mac}\0{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{digest}"


def ticket_ok(value: str, user: str, mac: str) -> bool:
    expires = int(value.split(".", 1)[0])
    return expires > time.time() and hmac.compare_digest(value, ticket(user, mac, expires))


def logged_in(view: Callable) -> Callable:
    """A caller without a user's credentials gets 401. The web login's cookie does not
    count: a browser sends it on its own, so a mere form on a page would start the
    student's session on a seat of the page's choosing."""
    @functools.wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if g.caller.name is None or g.caller.via == "session":
            refused = error_response(401, "log in first: a user name and password "
                                          "(HTTP basic)")
            refused.headers["WWW-Authenticate"] = REALM
            return refused
        return view(*args, **kwargs)
    return checked


def _user_name(caller: Caller) -> str:
    """The caller's user name: ``logged_in`` let only users through."""
    if caller.name is None:
        raise ApiError(401, "log in first: a user name and password (HTTP basic)")
    return caller.name


def _seat(name: str) -> tuple[str, Node]:
    mac = script_mac(f"{name}.ipxe")
    if mac is None:
        raise not_found(f"{name[:40]} is not a seat (expected aa-bb-cc-dd-ee-ff)")
    with services().db.read() as session:
        node = session.scalar(select(Node).join(Port, Port.node_id == Node.id)
                              .where(Port.address == mac))
    if node is None:
        raise not_found(f"this PC ({mac}) is not enrolled in labmetal")
    svc = services()
    if leases_known(svc.settings.boot):
        with svc.db.read() as session:
            ours = holds_lease(session, [mac], caller_address())
        if not ours:  # a login for a seat is made at that seat, not from a neighbour
            raise ApiError(403, f"{caller_address()} is not the address of seat {mac}")
    return mac, node


def _allowed(action: str, caller: Caller, owner: str | None) -> bool:
    verdict = current_app.extensions["labmetal"].policy.verdict(action, caller.role)
    return verdict is Verdict.ALLOWED or (verdict is Verdict.OWN_ONLY and caller.name is not None
                                          and owner == caller.name)


@blueprint.get("/boot/<name>/login.ipxe")
@public("the seat menu's login item: boots labmetal's ramdisk, which asks for the password "
        "and sends it over HTTPS; nothing secret is in it")
@produces("text/plain")
def login_script(name: str):
    mac = script_mac(f"{name}.ipxe")
    if mac is None:
        raise not_found(f"{name[:40]} is not a seat (expected aa-bb-cc-dd-ee-ff)")
    return ipxe_response(login_ramdisk(mac) or IdleScript(
        "the seat login needs the deploy kernel and ramdisk, and labmetal's HTTPS front"))


@blueprint.post("/v1/seat-login/<name>")
@public("a seat's login: the view refuses a caller without a user's credentials")
@logged_in
def login(name: str):
    """The caller's menu at this seat: ``choices`` (at most ``MAX_CHOICES``, ``left_off``
    says how many more) and the ``ticket`` to choose with. A choice has ``choice`` (what
    to send back), ``label``, ``template`` and ``kind`` (``resume`` or ``new``); a session's
    has ``saved_at``, its newest ``saves`` (``choice``, ``number``, ``label``,
    ``created_at``; ``saves_left_off``) and ``reset`` (the choice that starts it over),
    these two where the caller may reset it. In a room open for a TP, ``started`` instead:
    the student's session of it, started on this seat."""
    caller: Caller = g.caller
    mac, node = _seat(name)
    with services().db.read() as session:
        tp = session.scalar(select(Template.name).join(Room, Room.tp_template_id == Template.id)
                            .join(Seat, Seat.room_id == Room.id)
                            .where(Seat.node_id == node.id))
        rows = session.execute(
            select(StudentSession.id, StudentSession.uuid, StudentSession.state,
                   StudentSession.last_saved_at, Template.name)
            .join(User, User.id == StudentSession.user_id)
            .join(TemplateVersion, TemplateVersion.id == StudentSession.template_version_id)
            .join(Template, Template.id == TemplateVersion.template_id)
            .where(User.name == caller.name, StudentSession.state.in_(LIVE))
            .order_by(Template.name)).all()
        templates = session.scalars(select(Template.name).where(Template.versions.any())
                                    .order_by(Template.name)).all()
        startable = [row for row in rows if row[2] not in BUSY]  # not on another seat
        saves = _saves(session, [row[0] for row in startable[:MAX_CHOICES]])
    if tp is not None:
        rows = [row for row in rows if row[4] == tp]
        startable = [row for row in startable if row[4] == tp]
        templates = [name for name in templates if name == tp]
    may_reset = _allowed("session:reset", caller, caller.name)
    choices = [_session_choice(uuid, saved, template, saves.get(ident, []), may_reset)
               for ident, uuid, _, saved, template in startable]
    if _allowed("session:create", caller, caller.name):
        have = {row[4] for row in rows}
        choices += [{"choice": f"t-{name}", "label": f"{name}: new session", "template": name,
                     "kind": "new"} for name in templates if name not in have]
    if not choices:
        running = "running on another seat" if rows else "to start here"
        raise conflict(f"{caller.name} has no {tp or 'TP'} session {running}")
    if tp is not None:
        return {"student": caller.name, "started": _start(caller, node, choices[0]["choice"])}
    return {"student": caller.name, "choices": choices[:MAX_CHOICES],
            "left_off": max(0, len(choices) - MAX_CHOICES),
            "ticket": ticket(_user_name(caller), mac)}


def _saves(session: Any, session_ids: list[int]) -> dict[int, list[tuple[int, str, Any]]]:
    """The save points (number, label, when) of these sessions, newest first."""
    found: dict[int, list[tuple[int, str, Any]]] = {}
    if not session_ids:
        return found
    for ident, number, label, created in session.execute(
            select(SessionSave.session_id, SessionSave.number, SessionSave.label,
                   SessionSave.created_at)
            .where(SessionSave.session_id.in_(session_ids))
            .order_by(SessionSave.session_id, SessionSave.number.desc())):
        found.setdefault(ident, []).append((number, label, created))
    return found


def _session_choice(uuid: str, saved: Any, template: str, saves: list[tuple[int, str, Any]],
                    may_reset: bool) -> dict[str, Any]:
    when = f"saved {saved:%Y-%m-%d %H:%M}" if saved else "not saved yet"
    choice: dict[str, Any] = {"choice": f"s-{uuid}", "label": f"{template} ({when})",
                              "template": template, "kind": "resume",
                              "saved_at": isotime(saved)}
    if may_reset:
        choice["reset"] = f"r-{uuid}"
        choice["saves"] = [{"choice": f"v-{uuid}-{number}", "number": number,
                            "label": label[:MAX_LABEL], "created_at": isotime(created)}
                           for number, label, created in saves[:MAX_SAVES]]
        choice["saves_left_off"] = max(0, len(saves) - MAX_SAVES)
    return choice


@blueprint.post("/v1/seat-login/<name>/start")
@public("a seat's login: the view refuses a caller without a user's credentials")
@logged_in
@body(START)
def start(name: str, body: dict[str, Any]):
    """``s-<session uuid>`` resumes a session, ``v-<session uuid>-<save number>`` goes back
    to a save point then resumes, ``r-<session uuid>`` starts it over from its template
    then resumes, ``t-<template>`` begins one, on this seat; the seat then reboots into it
    (its boot script sanboots the session's disk)."""
    caller: Caller = g.caller
    mac, node = _seat(name)
    if not ticket_ok(body["ticket"], _user_name(caller), mac):
        raise ApiError(409, "this menu is too old or not yours: log in again")
    return _start(caller, node, body["choice"])


def _start(caller: Caller, node: Node, text: str) -> dict[str, Any]:
    """Do the choice on this seat (reverting or resetting first); what the seat shows.
    The seat is checked before a revert or a reset, so one refused for the seat's sake
    loses nothing."""
    choice = parse_choice(text)
    if choice.kind == "new":
        if not _allowed("session:create", caller, caller.name):
            raise ApiError(403, f"{caller.name} may not start new sessions")
        if node.provision_state in states.RAMDISK_MODE:
            raise conflict(f"this seat is {node.provision_state}")
        ident = new_session(choice.ident, _user_name(caller))["uuid"]
    else:
        ident = choice.ident
        owner = session_owner(ident)
        if not _allowed("session:resume", caller, owner):
            raise not_found(f"Session {ident} could not be found.")
        if choice.kind != "resume" and not _allowed("session:reset", caller, owner):
            raise ApiError(403, f"{caller.name} may not go back to a save point or to the "
                                "template")
        if node.provision_state in states.RAMDISK_MODE:
            raise conflict(f"this seat is {node.provision_state}")
        door = services().sessions
        if choice.kind == "revert":
            door.revert(ident, _save_uuid(ident, choice.save), asker())
        elif choice.kind == "reset":
            door.reset(ident, asker())
    view = start_on_seat(ident, node.uuid, boot=False)  # the ramdisk reboots the seat
    return {"session": view["uuid"], "template": view["template"], "student": caller.name,
            "mode": view.get("mode", "iscsi")}


def _save_uuid(session_uuid: str, number: int | None) -> str:
    """The UUID of the session's save point of that number: the door also finds a save by
    label, and a label may be another save's number."""
    with services().db.read() as session:
        found = session.scalar(
            select(SessionSave.uuid).join(StudentSession,
                                          StudentSession.id == SessionSave.session_id)
            .where(StudentSession.uuid == session_uuid, SessionSave.number == number))
    if found is None:
        raise not_found(f"Session {session_uuid} has no save point {number}")
    return found
