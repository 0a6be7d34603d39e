"""/v1/rooms/<room>/tp: a teacher opens a room for a TP. The room's seats are powered on
(those that are off); when the TP's sessions run from the seats' disks, a room job sends
its template into every free seat's cache first (by multicast for a room: ``cache_job``).
A student who logs in at one of the seats (the seat's menu, api/seat_login.py) goes
straight into their own session of that TP's template, made on the spot if they have none
yet. Closing the TP changes nothing that runs: each session
ends when its seat is powered off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, g
from sqlalchemy import select

from labmetal import states
from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.errors import conflict
from labmetal.api.rooms import room_view, seat_count
from labmetal.lookup import find_room
from labmetal.api.common import asker
from labmetal.api.sessions import BUSY, boot_seat
from labmetal.conductor.session_door import session_mode
from labmetal.lookup import find_template
from labmetal.api.validation import Field, body, obj
from labmetal.models import Node, Seat, StudentSession, utcnow

blueprint = Blueprint("room_tp", __name__)
OPEN_TP = obj("the TP a room opens for",
              Field("template", str, required=True, description="the template's name or UUID"),
              Field("power_on", bool, default=True,
                    description="power on the room's seats that are off"))


@blueprint.put("/v1/rooms/<ident>/tp")
@authorize("room:deploy")
@body(OPEN_TP)
def open_tp(ident: str, body: dict[str, Any]):
    """The room's view, with ``powered_on`` (seat labels asked to power on) and
    ``not_powered`` (label -> why not: no BMC, locked...)."""
    svc = services()
    with svc.db.write() as session:
        room = find_room(session, ident)
        template = find_template(session, body["template"])
        if not template.versions:
            raise conflict(f"Template {template.name} has no version yet.")
        room.tp_template, room.tp_started_by = template, g.caller.name
        room.tp_started_at = utcnow()
        session.flush()
        view = room_view(room, seat_count(session, room))
        seats = session.execute(
            select(Seat.label, Node.id, Node.uuid, Node.power_state, Node.provision_state)
            .join(Node, Node.id == Seat.node_id).where(Seat.room_id == room.id)
            .order_by(Seat.label)).all()
        busy = set(session.scalars(select(StudentSession.seat_node_id).where(
            StudentSession.state.in_(BUSY))))
        latest = max(template.versions, key=lambda v: v.version)
        version = CachedVersion(latest.id, session_mode(latest) == "local")
    # a TP whose sessions run from the seats' disks: its template goes to every seat's
    # cache now, by multicast for the room, before anyone logs in (conductor/roomjobs.py)
    cache_job = None
    if version.local:
        free = [label for label, node_id, _, _, provision in seats
                if node_id not in busy and provision not in states.RAMDISK_MODE]
        cache_job = svc.jobs.cache_template(ident, version.id, free, asker()) if free else None
    powered, not_powered = [], {}
    for label, node_id, node_uuid, power, provision in seats if body["power_on"] else ():
        if power == states.POWER_ON or provision in states.RAMDISK_MODE or node_id in busy:
            continue
        why_not = boot_seat(node_uuid, f"for TP {template.name} in room {view['name']}")
        if why_not:
            not_powered[label] = why_not
        else:
            powered.append(label)
    return {**view, "powered_on": powered, "not_powered": not_powered,
            "cache_job": cache_job}


@blueprint.delete("/v1/rooms/<ident>/tp")
@authorize("room:deploy")
def close_tp(ident: str):
    with services().db.write() as session:
        room = find_room(session, ident)
        room.tp_template = room.tp_started_by = room.tp_started_at = None
    services().jobs.cancel_caching(ident, asker())
    return "", 204


@dataclass(frozen=True)
class CachedVersion:
    """The TP's newest template version, and whether its sessions run from the seats'
    disks (then the room's seats are sent it when the room opens)."""
    id: int
    local: bool
