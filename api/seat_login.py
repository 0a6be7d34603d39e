"""A student at a seat: the seat's iPXE menu (api/boot.py) offers a login; iPXE's ``login``
prompt reads a user name and password, and the next scripts come with them (HTTP basic,
sent when these views answer 401). After the login the student picks one of their TP
sessions, or a template to start a new one, and the seat sanboots that disk at once.

The credentials are checked like any API caller's (labmetal's users, LDAP), and the choice
by the same policy actions as ``POST /v1/sessions`` and ``/v1/sessions/<id>/start``. iPXE
can only GET here (Debian's iPXE has no ``params`` for a POST), so the start URL carries
a ticket the login made for this user and seat, valid for a few minutes: a link on a web
page cannot start a session with a browser's remembered credentials. Errors come back as
scripts that show the message on the seat and return to its menu.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, g
from sqlalchemy import select

from labmetal import states
from labmetal.api.app import services
from labmetal.api.auth import Caller, public
from labmetal.api.boot import ipxe_response, mac_path, script_for
from labmetal.api.errors import ApiError, bad_request, not_found
from labmetal.api.seat_address import caller_address, holds_lease, leases_known
from labmetal.api.sessions import LIVE, new_session, session_owner, start_on_seat
from labmetal.api.validation import Field, produces, query
from labmetal.models import  Node, Port, Room, Seat, StudentSession, Template, TemplateVersion, User
from labmetal.policy import Verdict
from labmetal.pxe.ipxe import MessageScript, SessionMenuScript, script_mac

blueprint = Blueprint("seat_login", __name__)
REALM = 'Basic realm="labmetal seat login"'
IPXE = "text/plain"  # an iPXE script
CHOICE = re.compile(r"[st]-[A-Za-z0-9-]{1,80}")
TICKET_SECONDS = 600
TICKET = Field("ticket", str, required=True, pattern=r"^[0-9]{1,12}\.[0-9a-f]{64}$",
               max_length=77, example=f"1800000000.{'0' * 64}",
               description="made by the login for this user and seat, for ten minutes")


def ticket(user: str, mac: str, expires: int | None = None) -> str:
    expires = expires or int(time.time()) + TICKET_SECONDS
    key = services().box.derive("seat login tickets")
    digest = hmac.new(key, f"{user}\0{mac}\0{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{digest}"


def ticket_ok(value: str, user: str, mac: str) -> bool:
    expires = int(value.split(".", 1)[0])
    return expires > time.time() and hmac.compare_digest(value, ticket(user, mac, expires))


def logged_in(view: Callable) -> Callable:
    """A caller without a user's credentials gets the 401 that makes iPXE send them. The
    web login's cookie does not count: a browser sends it on its own, so a mere link to
    this URL would start the student's session on a seat of the link's choosing."""
    @functools.wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if g.caller.name is None or g.caller.via == "session":
            return Response("labmetal: log in first\n", 401, {"WWW-Authenticate": REALM},
                            mimetype="text/plain")
        return view(*args, **kwargs)
    return checked


def _seat(name: str) -> tuple[str, Node]:
    mac = script_mac(f"{name}.ipxe")
    if mac is None:
        raise not_found(f"{name} is not a seat (expected aa-bb-cc-dd-ee-ff)")
    with services().db.read() as session:
        node = session.scalar(select(Node).join(Port, Port.node_id == Node.id)
                              .where(Port.address == mac))
    if node is None:
        raise not_found(f"this PC ({mac}) is not enrolled in labmetal")
    svc = services()
    if leases_known(svc.settings):
        with svc.db.read() as session:
            ours = holds_lease(session, [mac], caller_address())
        if not ours:  # a login for a seat is made at that seat, not from a neighbour
            raise ApiError(403, f"{caller_address()} is not the address of seat {mac}")
    return mac, node


def _message(mac: str, text: str) -> Response:
    return ipxe_response(MessageScript(services().settings.seat_base_url, mac_path(mac), text))


def _allowed(action: str, caller: Caller, owner: str | None) -> bool:
    verdict = current_app.extensions["labmetal"].policy.verdict(action, caller.role)
    return verdict is Verdict.ALLOWED or (verdict is Verdict.OWN_ONLY and caller.name is not None
                                          and owner == caller.name)


@blueprint.get("/boot/<name>/login.ipxe")
@public("a seat's login: the view refuses a caller without a user's credentials")
@logged_in
@produces(IPXE)
def login(name: str):
    """The menu of the caller's sessions (not running elsewhere) and of the templates they
    have no session of yet. In a room open for a TP, that TP's only, and no menu: the
    student's session of it starts at once."""
    caller: Caller = g.caller
    mac, node = _seat(name)
    with services().db.read() as session:
        tp = session.scalar(select(Template.name).join(Room, Room.tp_template_id == Template.id)
                            .join(Seat, Seat.room_id == Room.id)
                            .where(Seat.node_id == node.id))
        rows = session.execute(
            select(StudentSession.uuid, StudentSession.state, StudentSession.last_saved_at,
                   Template.name)
            .join(User, User.id == StudentSession.user_id)
            .join(TemplateVersion, TemplateVersion.id == StudentSession.template_version_id)
            .join(Template, Template.id == TemplateVersion.template_id)
            .where(User.name == caller.name, StudentSession.state.in_(LIVE))
            .order_by(Template.name)).all()
        templates = session.scalars(select(Template.name).where(Template.versions.any())
                                    .order_by(Template.name)).all()
    if tp is not None:
        rows = [row for row in rows if row[3] == tp]
        templates = [name for name in templates if name == tp]
    choices = []
    for uuid, state, saved, template in rows:
        if state in ("starting", "running"):
            continue  # on another seat: it cannot start here
        when = f"saved {saved:%Y-%m-%d %H:%M}" if saved else "not saved yet"
        choices.append((f"s-{uuid}", f"{template} ({when})"))
    if _allowed("session:create", caller, caller.name):
        have = {template for *_, template in rows}
        choices += [(f"t-{name}", f"{name}: new session") for name in templates
                    if name not in have]
    if not choices:
        running = "running on another seat" if rows else "to start here"
        return _message(mac, f"{caller.name} has no {tp or 'TP'} session {running}")
    if tp is not None:
        return _start(caller, mac, node, choices[0][0])
    return ipxe_response(SessionMenuScript(services().settings.seat_base_url, mac_path(mac),
                                           caller.name, tuple(choices[:9]),
                                           ticket(caller.name, mac)))


@blueprint.get("/boot/<name>/start/<choice>.ipxe")
@public("a seat's login: the view refuses a caller without a user's credentials")
@logged_in
@query(TICKET)
@produces(IPXE)
def start(name: str, choice: str, query: dict[str, Any]):
    """``s-<session uuid>`` resumes a session, ``t-<template>`` begins one. The answer is
    this seat's script, which now sanboots the session."""
    caller: Caller = g.caller
    mac, node = _seat(name)
    if not CHOICE.fullmatch(choice):
        raise bad_request(f"{choice[:80]!r} is not a choice of the seat's menu")
    if not ticket_ok(query["ticket"], caller.name, mac):
        return _message(mac, "this menu is too old: log in again")
    return _start(caller, mac, node, choice)


def _start(caller: Caller, mac: str, node: Node, choice: str) -> Response:
    """Resume (``s-``) or begin (``t-``) the session on this seat; the seat's next script."""
    try:
        if choice.startswith("s-"):
            ident = choice[2:]
            if not _allowed("session:resume", caller, session_owner(ident)):
                raise not_found(f"Session {ident} could not be found.")
        else:
            if not _allowed("session:create", caller, caller.name):
                raise ApiError(403, f"{caller.name} may not start new sessions")
            ident = new_session(choice[2:], caller.name)["uuid"]
        if node.provision_state in states.RAMDISK_MODE:
            raise ApiError(409, f"this seat is {node.provision_state}")
        start_on_seat(ident, node.uuid, boot=False)  # the seat is in iPXE already
    except ApiError as error:
        return _message(mac, error.message)
    return ipxe_response(script_for(mac))
