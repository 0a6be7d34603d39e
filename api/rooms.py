"""/v1/rooms and /v1/room-jobs: a teacher's view of a room as seats, and the jobs that
image or power a whole room, now or at a set time.

The API only writes intent (a room job and its seat rows); the conductor that owns the
job (conductor/roomjobs.py) carries it out, so a job survives restarts of any process.
"""
from __future__ import annotations

import csv
import io
import re
from typing import Any

from flask import Blueprint, request
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labmetal import history, schedule, states
from labmetal.api.services import services
from labmetal.api.auth import authorize, check_allowed
from labmetal.api.common import asker, caller_name, isotime, links
from labmetal.lookup import find_node
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.nodes import check_fields
from labmetal.api.ports import normalize_mac
from labmetal.api.validation import DOT_NAMES, Field, accepts, body, name_check, obj
from labmetal.conductor.job_door import ACTIONS, POWER_OFF, TRANSPORTS, JobOrder
from labmetal.lookup import find_job, find_room
from labmetal.conductor.roomjobs import SeatUpdate, seat_from_node
from labmetal.lifecycles import (JOB_RUNNING, JOB_SCHEDULED, SEAT_IDLE, SEAT_IN_PROGRESS,
                                 SESSION_BUSY)
from labmetal.models import (Node, Port, Room, RoomJob, RoomJobSeat, Seat, StudentSession, User,
                             new_uuid)

blueprint = Blueprint("rooms", __name__)

ROOM_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SEAT_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
MAX_RETRIES = 10
CSV_COLUMNS = ("seat", "name", "mac", "driver", "ipmi_address", "ipmi_port", "ipmi_username",
               "ipmi_password", "wol_host", "wol_port", "deploy_kernel", "deploy_ramdisk")

_DESCRIPTION = Field("description", str | None, description="free text, for people")
_BAD_NAME = ("Invalid room name {value!r}: 1-64 of letters, digits and '._-', not '.' or "
             "'..', not a UUID")
NEW_ROOM = obj("a new room",
               Field("name", str, required=True, pattern=ROOM_NAME.pattern,
                     description="1-64 of letters, digits and '._-', not '.' or '..', not a UUID",
                     example="TPR-2", error=_BAD_NAME, check=name_check(_BAD_NAME)),
               _DESCRIPTION)
ROOM_CHANGE = obj("a room's change (only its description)", _DESCRIPTION)
SEAT = obj("a seat", Field("node", str, required=True, description="a node's name or UUID",
                           example="tpr2-a01"))
NEW_JOB = obj(
    "a room job",
    Field("action", str, enum=ACTIONS, default="deploy",
          description="power-off also needs the room:power policy"),
    Field("image", str | None,
          description="deploy: the name or UUID of an active whole-disk or partition image"),
    Field("at", str | None, description="when: null for now, \"HH:MM\" (the next one) or an "
                                        "ISO 8601 time, in the lab's time zone unless given"),
    Field("repeat", str | None, enum=("none", *schedule.REPEATS),
          description="run again at the same time every day or week"),
    Field("transport", str, enum=TRANSPORTS, default="auto",
          description="how the image reaches the seats; auto picks multicast for many"),
    Field("retries", int, minimum=0, maximum=MAX_RETRIES, default=2,
          description="new attempts per failed seat",
          error=f"Invalid retries {{value!r}}: a whole number from 0 to {MAX_RETRIES}"),
    Field("seats", list | None, items=Field("label", str), min_items=1,
          description="the seat labels, or null for every seat",
          error="Invalid seats: a non-empty list of seat labels, or null for all"))


# -- views -------------------------------------------------------------------------------
def room_view(room: Room, seats: int) -> dict[str, Any]:
    tp = {"template": room.tp_template.name, "started_by": room.tp_started_by,
          "started_at": isotime(room.tp_started_at)} if room.tp_template else None
    return {"uuid": room.uuid, "name": room.name, "description": room.description,
            "seat_count": seats, "tp": tp, "created_at": isotime(room.created_at),
            "links": links("rooms", room.name)}


def job_view(job: RoomJob, room_name: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for seat in job.seats:
        counts[seat.state] = counts.get(seat.state, 0) + 1
    return {"uuid": job.uuid, "room": room_name, "action": job.action,
            "image": job.image_name, "state": job.state, "transport": job.transport,
            "chosen_transport": job.chosen_transport, "retries": job.retries,
            # what the job's multicast sender sent, once it stopped (the room's network cost)
            "multicast_sent_bytes": (job.multicast or {}).get("sent_bytes"),
            "scheduled_at": isotime(job.scheduled_at), "repeat": job.repeat,
            "conductor": job.owner, "created_by": job.created_by,
            "started_at": isotime(job.started_at), "finished_at": isotime(job.finished_at),
            "last_error": job.last_error, "counts": counts,
            "seats": [{"label": seat.label, "state": seat.state, "progress": seat.progress,
                       "attempts": seat.attempts, "error": seat.error} for seat in job.seats],
            "links": links("room-jobs", job.uuid)}


def _live(job: RoomJob | None, seat: RoomJobSeat | None, node: Node) -> SeatUpdate | None:
    """A seat's state in the room's job. A seat being deployed is read from its node, as
    the job's conductor reads it on each pass: the grid goes on moving while that conductor
    is taken over (its passes stop for the time it takes) or busy."""
    if seat is None:
        return None
    stored = SeatUpdate(seat.state, seat.progress)
    if job is None or job.state != JOB_RUNNING or job.action != "deploy" \
            or seat.state not in SEAT_IN_PROGRESS or seat.requested_at is None:
        return stored
    return seat_from_node(node) or stored


def seat_count(session: Session, room: Room) -> int:
    return session.scalar(select(func.count(Seat.id)).where(Seat.room_id == room.id)) or 0


def _current_job(session: Session, room: Room) -> RoomJob | None:
    """The running job, else the most recent one started; scheduled ones are listed apart."""
    return session.scalar(select(RoomJob).where(RoomJob.room_id == room.id,
                                                RoomJob.state != JOB_SCHEDULED)
                          .order_by((RoomJob.state == JOB_RUNNING).desc(),
                                    RoomJob.started_at.desc(), RoomJob.id.desc()).limit(1))


# -- rooms -------------------------------------------------------------------------------
@blueprint.get("/v1/rooms")
@authorize("room:get")
def list_rooms():
    with services().db.read() as session:
        counts = dict(session.execute(select(Seat.room_id, func.count(Seat.id))
                                      .group_by(Seat.room_id)).all())
        rooms = session.scalars(select(Room).order_by(Room.name)).all()
        return {"rooms": [room_view(room, counts.get(room.id, 0)) for room in rooms]}


@blueprint.post("/v1/rooms")
@authorize("room:create")
@body(NEW_ROOM)
def create_room(body: dict[str, Any]):
    name, description = body["name"], body.get("description")
    try:
        with services().db.write() as session:
            if session.scalar(select(Room.id).where(Room.name == name)):
                raise conflict(f"A room named {name} already exists.")
            room = Room(name=name, description=description)
            session.add(room)
            session.flush()
            view = room_view(room, 0)
    except IntegrityError:
        raise conflict(f"A room named {name} already exists.") from None
    return view, 201, {"Location": view["links"][0]["href"]}


@blueprint.get("/v1/rooms/<ident>")
@authorize("room:get")
def show_room(ident: str):
    """The room as its seat grid: each seat's node state and its state in the current job."""
    svc = services()
    with svc.db.read() as session:
        room = find_room(session, ident)
        rows = session.execute(select(Seat.label, Node).join(Node, Node.id == Seat.node_id)
                               .where(Seat.room_id == room.id).order_by(Seat.label)).all()
        job = _current_job(session, room)
        in_job = {seat.node_id: seat for seat in job.seats} if job else {}
        scheduled = session.scalars(select(RoomJob).where(RoomJob.room_id == room.id,
                                                          RoomJob.state == JOB_SCHEDULED)
                                    .order_by(RoomJob.scheduled_at)).all()
        students = dict(session.execute(
            select(StudentSession.seat_node_id, User.name)
            .join(User, User.id == StudentSession.user_id)
            .where(StudentSession.seat_node_id.in_([node.id for _, node in rows]),
                   StudentSession.state.in_(SESSION_BUSY))).all())
        seats = []
        for label, node in rows:
            seat = in_job.get(node.id)
            step = node.deploy_step or {}
            shown = _live(job, seat, node)
            seats.append({"label": label, "node_uuid": node.uuid, "node_name": node.name,
                          "power_state": node.power_state,
                          "provision_state": node.provision_state,
                          "last_error": node.last_error, "step": step.get("step"),
                          "state": shown.state if shown else SEAT_IDLE,
                          "progress": shown.progress if shown else 0,
                          "attempts": seat.attempts if seat else 0,
                          "error": seat.error if seat else None,
                          "student": students.get(node.id)})
        view = room_view(room, len(rows))
        view.update(seats=seats, job=job_view(job, room.name) if job else None,
                    scheduled=[job_view(each, room.name) for each in scheduled])
    return view


@blueprint.patch("/v1/rooms/<ident>")
@authorize("room:update")
@body(ROOM_CHANGE)
def update_room(ident: str, body: dict[str, Any]):
    with services().db.write() as session:
        room = find_room(session, ident)
        room.description = body.get("description")
        session.flush()
        return room_view(room, seat_count(session, room))


@blueprint.delete("/v1/rooms/<ident>")
@authorize("room:delete")
def delete_room(ident: str):
    """The nodes stay enrolled; only the room, its seat labels and its job history go."""
    with services().db.write() as session:
        room = find_room(session, ident)
        running = session.scalar(select(RoomJob.uuid).where(RoomJob.room_id == room.id,
                                                            RoomJob.state == JOB_RUNNING))
        if running:
            raise conflict(f"Room {room.name} has a running job ({running}); cancel it first")
        session.delete(room)
    return "", 204


@blueprint.put("/v1/rooms/<ident>/seats/<label>")
@authorize("room:update")
@body(SEAT)
def put_seat(ident: str, label: str, body: dict[str, Any]):
    if not seat_label_ok(label):
        raise bad_request(f"Invalid seat label {label!r}: 1-32 of letters, digits and '._-', "
                          "not '.' or '..'")
    with services().db.write() as session:
        room = find_room(session, ident)
        node = find_node(session, body["node"])
        _place(session, room, label, node)
        return {"label": label, "node_uuid": node.uuid, "node_name": node.name}


@blueprint.delete("/v1/rooms/<ident>/seats/<label>")
@authorize("room:update")
def delete_seat(ident: str, label: str):
    with services().db.write() as session:
        room = find_room(session, ident)
        deleted = session.execute(delete(Seat).where(Seat.room_id == room.id,
                                                     Seat.label == label))
        if not deleted.rowcount:  # type: ignore[attr-defined]  # a CursorResult
            raise not_found(f"Room {room.name} has no seat {label}")
    return "", 204


def _place(session: Session, room: Room, label: str, node: Node) -> None:
    """Seat ``node`` at ``label``: a node moved from elsewhere leaves its old seat."""
    taken = session.scalar(select(Seat).where(Seat.room_id == room.id, Seat.label == label))
    if taken is not None and taken.node_id != node.id:
        other = session.get(Node, taken.node_id)
        raise conflict(f"Seat {label} of room {room.name} is taken by node "
                       f"{other.name or other.uuid}; free it first")  # type: ignore[union-attr]
    session.execute(delete(Seat).where(Seat.node_id == node.id))
    session.add(Seat(room_id=room.id, label=label, node_id=node.id))
    session.flush()


# -- CSV import --------------------------------------------------------------------------
@blueprint.post("/v1/rooms/<ident>/import")
@authorize("room:update")
@accepts("text/csv", f"a header row, then a seat a line; columns: {', '.join(CSV_COLUMNS)} "
                     "(seat and mac are needed)")
def import_room(ident: str):
    """Seats from CSV (a header row, columns of CSV_COLUMNS): a MAC not known yet becomes a
    node with its port, a known MAC keeps its node and takes the seat. All rows or none:
    one bad row and nothing changes, and every bad row is named. Only as ``text/csv``: a
    CSV sent as text/plain could come from another site's form with the browser's
    remembered password (api/auth.py refuses those types everywhere, this view takes no
    other type either)."""
    if request.mimetype != "text/csv":
        raise ApiError(415, "Send the room as CSV with Content-Type: text/csv (a header row, "
                            f"then a seat a line: {','.join(CSV_COLUMNS)})")
    text = request.get_data(as_text=True)
    if not text.strip():
        raise bad_request(f"Send the room as CSV with a header row: {','.join(CSV_COLUMNS)}")
    rows, errors = _parse_csv(text)
    if errors:
        raise bad_request("The CSV was not imported: " + "; ".join(errors))
    svc = services()
    created = updated = 0
    with svc.db.write() as session:
        room = find_room(session, ident)
        for line, row in rows:
            port = session.scalar(select(Port).where(Port.address == row["mac"]))
            if port is not None:
                node = session.execute(select(Node).where(Node.id == port.node_id)).scalar_one()
                updated += 1
            else:
                if row["name"] and session.scalar(select(Node.id).where(Node.name == row["name"])):
                    raise conflict(f"line {line}: a node named {row['name']} already exists "
                                   "with another MAC; nothing was imported")
                node = Node(uuid=new_uuid(), name=row["name"] or None, driver=row["driver"],
                            driver_info=svc.box.seal_changed(row["driver_info"], {}),
                            provision_state=states.ENROLL, deploy_interface="direct")
                session.add(node)
                session.flush()
                session.add(Port(address=row["mac"], node_id=node.id))
                history.record(session, node.id, "provisioning",
                               f"node enrolled with driver '{node.driver}' by the import of "
                               f"room {room.name}", user=caller_name())
                created += 1
            try:
                _place(session, room, row["seat"], node)
            except Exception as error:
                raise conflict(f"line {line}: {getattr(error, 'message', error)}; nothing "
                               "was imported") from None
    return {"created": created, "updated": updated, "errors": []}


def _parse_csv(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    unknown = sorted(set(header) - set(CSV_COLUMNS))
    missing = [name for name in ("seat", "mac") if name not in header]
    if unknown or missing:
        return [], [f"header: unknown column(s) {', '.join(unknown)}" if unknown else
                    f"header: missing column(s) {', '.join(missing)}"]
    rows, errors = [], []
    macs: dict[str, int] = {}
    labels: dict[str, int] = {}
    for line, raw in enumerate(reader, start=2):
        cells = {key: (value or "").strip() for key, value in raw.items() if key}
        try:
            rows.append((line, _row(cells)))
        except Exception as error:
            errors.append(f"line {line}: {getattr(error, 'message', error)}")
            continue
        row = rows[-1][1]
        for seen, key, what in ((macs, "mac", "MAC"), (labels, "seat", "seat")):
            if row[key] in seen:
                errors.append(f"line {line}: {what} {row[key]} is also on line {seen[row[key]]}")
            seen[row[key]] = line
    return rows, errors


def seat_label_ok(label: str) -> bool:
    """A seat label is in URLs too (``/v1/rooms/R/seats/A07``): not ``.`` nor ``..``."""
    return bool(SEAT_LABEL.match(label)) and label not in DOT_NAMES


def _row(cells: dict[str, str]) -> dict[str, Any]:
    if not seat_label_ok(cells.get("seat", "")):
        raise ValueError(f"invalid seat label {cells.get('seat')!r}")
    mac = normalize_mac(cells.get("mac", ""))
    driver = cells.get("driver") or ("ipmi" if cells.get("ipmi_address") else "wol")
    info: dict[str, Any] = {}
    for key in CSV_COLUMNS[4:]:
        if cells.get(key):
            info[key] = int(cells[key]) if key.endswith("_port") and cells[key].isdigit() \
                else cells[key]
    values = {"name": cells.get("name") or None, "driver": driver, "driver_info": info}
    check_fields(values)
    return {"seat": cells["seat"], "mac": mac, **values}


# -- room jobs ---------------------------------------------------------------------------
@blueprint.post("/v1/rooms/<ident>/jobs")
@authorize("room:deploy")
@body(NEW_JOB)
def create_job(ident: str, body: dict[str, Any]):
    if body["action"] == POWER_OFF:
        check_allowed("room:power")
    seats = body.get("seats")
    order = JobOrder(body["action"], body.get("image"), body["transport"], body["retries"],
                     body.get("at"), body.get("repeat"),
                     tuple(seats) if seats is not None else None)
    svc = services()
    view = _job(svc.jobs.create(ident, order, asker()))
    return view, 201, {"Location": view["links"][0]["href"]}


def _job(job_ident: str) -> dict[str, Any]:
    with services().db.read() as session:
        job = find_job(session, job_ident)
        room = session.execute(select(Room.name).where(Room.id == job.room_id)).scalar_one()
        return job_view(job, room)


@blueprint.get("/v1/rooms/<ident>/jobs")
@authorize("room:get")
def list_jobs(ident: str):
    with services().db.read() as session:
        room = find_room(session, ident)
        jobs = session.scalars(select(RoomJob).where(RoomJob.room_id == room.id)
                               .order_by(RoomJob.scheduled_at.desc()).limit(100)).all()
        return {"jobs": [job_view(job, room.name) for job in jobs]}


@blueprint.get("/v1/room-jobs/<ident>")
@authorize("room:get")
def show_job(ident: str):
    return _job(ident)


@blueprint.post("/v1/room-jobs/<ident>/cancel")
@authorize("room:deploy")
def cancel_job(ident: str):
    """Seats not finished are cancelled; the conductor aborts the deploys it can stop."""
    return _job(services().jobs.cancel(ident, asker()))


@blueprint.post("/v1/room-jobs/<ident>/seats/<label>/retry")
@authorize("room:deploy")
def retry_seat(ident: str, label: str):
    """Re-image one seat: it is queued again with fresh attempts, and a finished job runs
    again for that seat alone."""
    return _job(services().jobs.retry_seat(ident, label, asker()))
