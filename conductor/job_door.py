"""The one door to room jobs, in the shape of the nodes' (``conductor/door.py``): a teacher's
"image room Y (at 08:00)", "cancel it", "re-image seat A03" is checked and recorded here,
then the conductors are woken; the conductor owning the job (``conductor/roomjobs.py``)
carries it out from the rows alone.

Refusals are the domain errors of ``labmetal/errors.py``; the API maps them to HTTP in one
place. Authorization stays with the caller (the API's policy): this module decides only
whether the request can apply.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from labmetal import schedule
from labmetal.conductor.door import Asker
from labmetal.errors import Conflict, InvalidRequest, NotFound
from labmetal.conductor.roomjobs import CACHE, cancel_waits
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.db import Database
from labmetal.lifecycles import (JOB_CANCELLED, JOB_RUNNING, JOB_SCHEDULED, ROOM_JOB,
                                 ROOM_JOB_SEAT, SEAT_CANCELLED, SEAT_FINISHED, SEAT_QUEUED)
from labmetal.lookup import ImageUnusable, find_job, find_room, usable_image
from labmetal.models import (Image, Room, RoomJob, RoomJobSeat, Seat, SeatCache,
                             TemplateVersion, utcnow)

DEPLOY, POWER_OFF = "deploy", "power-off"
ACTIONS = (DEPLOY, POWER_OFF)  # what a teacher asks for
# CACHE: a room opening a TP puts the template version in its seats' caches (local
# sessions); made by open_tp (api/room_tp.py), not asked for by itself.
TRANSPORTS = ("auto", "unicast", "multicast")


@dataclass(frozen=True)
class JobOrder:
    """What is asked: ``at`` and ``repeat`` as a person writes them (labmetal/schedule.py);
    ``seats`` None for every seat of the room."""
    action: str
    image: str | None = None
    transport: str = "auto"
    retries: int = 2
    at: str | None = None
    repeat: str | None = None
    seats: tuple[str, ...] | None = None


class RoomJobDoor:
    def __init__(self, db: Database, conductors: ConductorAPI, timezone: str):
        self.db = db
        self.conductors = conductors
        self.timezone = timezone

    def create(self, room_ident: str, order: JobOrder, by: Asker) -> str:
        """Record the job and its seats; the job's UUID."""
        try:
            at = schedule.parse_at(order.at, self.timezone)
            repeat = schedule.check_repeat(order.repeat)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        with self.db.write() as session:
            room = find_room(session, room_ident)
            image = _job_image(session, order.image) if order.action == DEPLOY else None
            seats = session.execute(select(Seat.label, Seat.node_id)
                                    .where(Seat.room_id == room.id).order_by(Seat.label)).all()
            if order.seats is not None:
                unknown = sorted(set(order.seats) - {label for label, _ in seats})
                if unknown:
                    raise InvalidRequest(f"Room {room.name} has no seat(s) {', '.join(unknown)}")
                seats = [seat for seat in seats if seat[0] in set(order.seats)]
            if not seats:
                raise InvalidRequest(f"Room {room.name} has no seats: import them first "
                                     f"(POST /v1/rooms/{room.name}/import)")
            if at is None and order.action == DEPLOY:
                _refuse_overlap(session, room, [node_id for _, node_id in seats])
            job_uuid = _record(session, RoomJob(
                room_id=room.id, action=order.action, image_id=image.id if image else None,
                image_name=image.name if image else None, transport=order.transport,
                retries=order.retries, scheduled_at=at or utcnow(), repeat=repeat,
                created_by=by.user), seats)
        self.conductors.wake_all()
        return job_uuid

    def cache_template(self, room_ident: str, version_id: int, labels: list[str],
                       by: Asker) -> str | None:
        """A room opening a TP: the template version into the caches of these seats (those
        not holding it already), by multicast for a room, so that a student's login finds
        it there (issue 16). The room's earlier such job, if running, is cancelled. The
        job's UUID, or None if every seat holds the version."""
        with self.db.write() as session:
            room = find_room(session, room_ident)
            version = session.get(TemplateVersion, version_id)
            image = session.get(Image, version.image_id) \
                if version is not None and version.image_id else None
            if version is None or image is None:
                raise Conflict("the template version's image is gone")
            for earlier in session.scalars(select(RoomJob).where(
                    RoomJob.room_id == room.id, RoomJob.action == CACHE,
                    RoomJob.state.in_((JOB_SCHEDULED, JOB_RUNNING)))):
                self._cancel(session, earlier, "the room opened another TP")
            holding = set(session.scalars(select(SeatCache.node_id).where(
                SeatCache.origin_version_id == version.id, SeatCache.origin_complete)))
            seats = [(label, node_id) for label, node_id in session.execute(
                select(Seat.label, Seat.node_id).where(Seat.room_id == room.id,
                                                       Seat.label.in_(labels))
                .order_by(Seat.label)) if node_id not in holding]
            if not seats:
                return None
            job_uuid = _record(session, RoomJob(
                room_id=room.id, action=CACHE, image_id=image.id, image_name=image.name,
                template_version_id=version.id, transport="auto", retries=0,
                scheduled_at=utcnow(), created_by=by.user), seats)
        self.conductors.wake_all()
        return job_uuid

    def cancel_caching(self, room_ident: str, by: Asker) -> None:
        """The room's TP is closed: its seats stop being sent the template."""
        with self.db.write() as session:
            room = find_room(session, room_ident)
            for job in session.scalars(select(RoomJob).where(
                    RoomJob.room_id == room.id, RoomJob.action == CACHE,
                    RoomJob.state.in_((JOB_SCHEDULED, JOB_RUNNING)))):
                self._cancel(session, job, f"the TP was closed by {by.user or 'a user'}")
        self.conductors.wake_all()

    @staticmethod
    def _cancel(session: Session, job: RoomJob, why: str) -> None:
        job.state, job.finished_at, job.last_error = JOB_CANCELLED, utcnow(), why
        session.execute(update(RoomJobSeat).where(RoomJobSeat.job_id == job.id,
                                                  RoomJobSeat.state.not_in(SEAT_FINISHED))
                        .values(state=SEAT_CANCELLED))

    def cancel(self, job_ident: str, by: Asker) -> str:
        """Seats not finished are cancelled; seats waiting for their agent stop waiting."""
        with self.db.write() as session:
            job = find_job(session, job_ident)
            if not ROOM_JOB.allows(job.state, JOB_CANCELLED):
                raise Conflict(f"Room job {job.uuid} is {job.state}; only scheduled or running "
                               "jobs can be cancelled")
            session.execute(update(RoomJob).where(RoomJob.id == job.id)
                            .values(state=JOB_CANCELLED, finished_at=utcnow(), repeat=None,
                                    last_error=f"cancelled by {by.user or 'a user'}"))
            session.execute(update(RoomJobSeat).where(RoomJobSeat.job_id == job.id,
                                                      RoomJobSeat.state.not_in(SEAT_FINISHED))
                            .values(state=SEAT_CANCELLED))
            session.flush()
            cancel_waits(session, job.id, by.user)
            job_uuid = job.uuid
        self.conductors.wake_all()
        return job_uuid

    def retry_seat(self, job_ident: str, label: str, by: Asker) -> str:
        """Re-image one seat: queued again with fresh attempts; a finished job runs again
        for that seat alone."""
        with self.db.write() as session:
            job = find_job(session, job_ident)
            if job.action != DEPLOY:
                raise Conflict("Only deploy jobs re-image seats")
            if job.state in (JOB_SCHEDULED, JOB_CANCELLED):
                raise Conflict(f"Room job {job.uuid} is {job.state}; start a new job instead")
            seat = session.scalar(select(RoomJobSeat).where(RoomJobSeat.job_id == job.id,
                                                            RoomJobSeat.label == label))
            if seat is None:
                raise NotFound(f"Room job {job.uuid} has no seat {label}")
            if not ROOM_JOB_SEAT.allows(seat.state, SEAT_QUEUED):
                raise Conflict(f"Seat {label} is {seat.state}; wait for it to finish or fail")
            seat.state, seat.progress, seat.attempts, seat.error = SEAT_QUEUED, 0, 0, None
            seat.requested_at = None
            job.state, job.finished_at, job.last_error = JOB_RUNNING, None, None
            job_uuid = job.uuid
        self.conductors.wake_all()
        return job_uuid


def _record(session: Session, job: RoomJob, seats: Iterable[tuple[str, int]]) -> str:
    """The job and its seats (label, node id), recorded; its UUID."""
    session.add(job)
    session.flush()
    for label, node_id in seats:
        session.add(RoomJobSeat(job_id=job.id, node_id=node_id, label=label))
    return job.uuid


def _job_image(session: Session, ident: str | None) -> Image:
    if not isinstance(ident, str) or not ident:
        raise InvalidRequest("Mandatory field missing: image (a whole-disk or partition image)")
    try:
        return usable_image(session, ident, ("whole-disk", "partition"))
    except ImageUnusable as error:
        raise InvalidRequest(str(error)) from None


def _refuse_overlap(session: Session, room: Room, node_ids: list[int]) -> None:
    busy = session.execute(select(RoomJob.uuid, RoomJobSeat.label)
                           .join(RoomJobSeat, RoomJobSeat.job_id == RoomJob.id)
                           .where(RoomJob.state == JOB_RUNNING,
                                  RoomJobSeat.node_id.in_(node_ids),
                                  RoomJobSeat.state.not_in(SEAT_FINISHED))).first()
    if busy:
        raise Conflict(f"Seat {busy[1]} of room {room.name} is busy in room job {busy[0]}; "
                       "cancel that job or wait for it to finish")
