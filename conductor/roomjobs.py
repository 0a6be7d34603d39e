"""Room jobs carried out: the owning conductor starts due jobs, asks each seat's node for the
next step through the one door to a node's conductor (conductor/door.py), reads the nodes'
states back into the seats' states, retries failed seats, and runs the job's multicast sender.

A job is owned by the conductor the hash ring maps its UUID to (column ``owner``, taken by
compare-and-set; a dead owner's jobs are taken over like its nodes). Every step is derived
from the database again on each pass, so a restart of any process loses nothing.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update

from labmetal import history, schedule, states
from labmetal.agent.command_params import MulticastGroup
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.door import Asker, NodeDoor
from labmetal.errors import Busy, InvalidRequest, NoConductor
from labmetal.config import RoomJobSettings
from labmetal.db import Database
from labmetal.images.store import ImageStore
from labmetal.lifecycles import (JOB_ACTIVE, JOB_DONE, JOB_FAILED, JOB_RUNNING, JOB_SCHEDULED,
                                 SEAT_BOOTING, SEAT_DONE, SEAT_FAILED, SEAT_FINISHED, SEAT_POWERING,
                                 SEAT_VERIFYING, SEAT_WRITING)
from labmetal.models import Image, Node, RoomJob, RoomJobSeat, SeatCache, utcnow

LOG = logging.getLogger(__name__)

FINISHED = SEAT_FINISHED
SENDER_FIGURES = ("sent_bytes", "seats_complete")  # kept in a job's multicast once it ends
CACHE = "cache"  # a room opening a TP: the template into the seats' caches (job_door.CACHE)
DEPLOYABLE = {states.AVAILABLE: "deploy", states.ACTIVE: "rebuild",
              states.DEPLOY_FAILED: "deploy"}
# A node on its way to "available" that the job brings along (enroll -> manageable -> ...).
PREPARE = {states.ENROLL: "manage", states.MANAGEABLE: "provide"}
BUSY = {states.VERIFYING, states.CLEANING, states.CLEAN_WAIT, states.DELETING,
        states.INSPECTING, states.INSPECT_WAIT}


@dataclass
class SeatUpdate:
    state: str
    progress: int = 0
    error: str | None = None


def seat_from_node(node: Node) -> SeatUpdate | None:
    """What the teacher sees for a seat whose deploy was requested; None while unchanged."""
    state = node.provision_state
    step = node.deploy_step or {}
    if state == states.ACTIVE:
        return SeatUpdate(SEAT_DONE, 100)
    if state == states.DEPLOY_WAIT:
        return SeatUpdate(SEAT_BOOTING)
    if state == states.DEPLOYING:
        total, done = int(step.get("total") or 0), int(step.get("done") or 0)
        if step.get("step") and total:
            if done >= total:
                return SeatUpdate(SEAT_VERIFYING, 100)
            return SeatUpdate(SEAT_WRITING, min(99, done * 100 // total))
        return SeatUpdate(SEAT_WRITING if node.agent_url else SEAT_POWERING)
    return None


class RoomJobRunner:
    def __init__(self, settings: RoomJobSettings, db: Database, registry: ConductorRegistry,
                 store: ImageStore, hostname: str, door: NodeDoor) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry
        self.store = store
        self.hostname = hostname
        self.door = door
        self.asker = Asker(conductor=hostname, via="by a room job")
        self.senders: dict[str, Any] = {}  # job uuid -> MulticastSender

    # -- the pass ----------------------------------------------------------------------
    def tick(self, take_over: bool = True) -> None:
        """One pass; ``take_over``: also claim the jobs of conductors taken for dead (not
        while this conductor is just back from an absence: conductor/service.py)."""
        self._claim(take_over)
        with self.db.read() as session:
            jobs = session.scalars(select(RoomJob).where(RoomJob.owner == self.hostname,
                                                         RoomJob.state.in_(JOB_ACTIVE))).all()
            ids = [(job.id, job.state, job.scheduled_at) for job in jobs]
        now = utcnow()
        for job_id, state, scheduled_at in ids:
            try:
                if state == JOB_SCHEDULED and scheduled_at <= now:
                    self._start(job_id)
                self._advance(job_id)
            except Exception:
                LOG.exception("room job %s: pass failed; retried on the next one", job_id)
        self._stop_finished_senders()

    def stop(self) -> None:
        for sender in self.senders.values():
            sender.stop()
        self.senders.clear()

    def _claim(self, take_over: bool = True) -> None:
        live = set(self.registry.live())
        ring = self.registry.ring()
        orphaned = or_(RoomJob.owner.is_(None), RoomJob.owner.not_in(live)) if take_over \
            else RoomJob.owner.is_(None)
        with self.db.read() as session:
            rows = session.execute(select(RoomJob.id, RoomJob.uuid, RoomJob.owner).where(
                RoomJob.state.in_(JOB_ACTIVE), orphaned)).all()
        for job_id, uuid, owner in rows:
            if ring.owner(uuid) != self.hostname:
                continue
            with self.db.write() as session:
                claimed = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                    update(RoomJob).where(RoomJob.id == job_id, RoomJob.owner.is_(owner)
                                          if owner is None else RoomJob.owner == owner)
                    .values(owner=self.hostname)).rowcount
            if claimed and owner is not None:
                LOG.warning("room job %s: conductor %s is gone; %s carries it on", uuid,
                            owner, self.hostname)

    # -- starting ----------------------------------------------------------------------
    def _start(self, job_id: int) -> None:
        with self.db.write() as session:
            job = session.get(RoomJob, job_id)
            if job is None or job.state != JOB_SCHEDULED:
                return
            job.state, job.started_at = JOB_RUNNING, utcnow()
            if job.action in ("deploy", CACHE):
                job.chosen_transport = self._transport(job)
                if job.chosen_transport == "multicast":
                    job.multicast = self._multicast_address(session, job)
            if job.repeat:
                self._schedule_next(session, job)
            LOG.info("room job %s: started (%s, %d seats, %s)", job.uuid, job.action,
                     len(job.seats), job.chosen_transport or "-")

    def _transport(self, job: RoomJob) -> str:
        if job.transport != "auto":
            return job.transport
        return "multicast" if len(job.seats) >= self.settings.multicast_min_seats else "unicast"

    def _multicast_address(self, session: Any, job: RoomJob) -> dict[str, Any]:
        """A group no other running job uses, and where the seats send their requests."""
        taken = {row.get("group") for row in session.scalars(
            select(RoomJob.multicast).where(RoomJob.state == JOB_RUNNING,
                                            RoomJob.id != job.id))}
        network = ipaddress.IPv4Network(self.settings.multicast_groups)
        group = next((str(host) for host in network.hosts() if str(host) not in taken), None)
        if group is None:
            raise RuntimeError(f"every multicast group of {network} is in use")
        host = urlsplit(self.settings.seat_base_url).hostname or "127.0.0.1"
        port = self.settings.multicast_port
        return MulticastGroup(group=group, port=port, sender=f"{host}:{port + 1}",
                              interface=host, job=job.id).to_dict()

    def _schedule_next(self, session: Any, job: RoomJob) -> None:
        """A repeating job leaves its next occurrence behind when it starts."""
        at = schedule.next_occurrence(job.scheduled_at, job.repeat, self.settings.timezone)  # type: ignore[arg-type]
        following = RoomJob(room_id=job.room_id, action=job.action, image_id=job.image_id,
                            image_name=job.image_name, transport=job.transport,
                            retries=job.retries, scheduled_at=at, repeat=job.repeat,
                            created_by=job.created_by)
        session.add(following)
        session.flush()
        for seat in job.seats:
            session.add(RoomJobSeat(job_id=following.id, node_id=seat.node_id,
                                    label=seat.label))
        job.repeat = None

    # -- advancing ---------------------------------------------------------------------
    def _advance(self, job_id: int) -> None:
        with self.db.read() as session:
            job = session.get(RoomJob, job_id)
            if job is None or job.state != JOB_RUNNING:
                return
            seats = [(seat.id, SeatUpdate(seat.state, seat.progress), seat.requested_at,
                      seat.attempts, seat.node_id) for seat in job.seats]
            image = session.get(Image, job.image_id) if job.image_id else None
            action, retries, uuid = job.action, job.retries, job.uuid
            version_id = job.template_version_id
            multicast = sender_group(job.multicast)
        if action in ("deploy", CACHE) and image is None:
            self._finish(job_id, JOB_FAILED, "the job's image was deleted")
            return
        if multicast:
            self._ensure_sender(uuid, image, multicast)  # type: ignore[arg-type]
        for seat_id, shown, requested_at, attempts, node_id in seats:
            if shown.state in FINISHED:
                continue
            with self.db.read() as session:
                node = session.get(Node, node_id)
            if node is None:
                self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error="the node was deleted"))
            elif action == "power-off":
                self._power_off_seat(seat_id, node, requested_at)
            elif action == CACHE:
                self._cache_seat(seat_id, node, version_id, requested_at)
            else:
                self._deploy_seat(seat_id, shown, node, requested_at, attempts, retries,
                                  image, uuid, multicast)  # type: ignore[arg-type]
        with self.db.read() as session:
            left = [seat.state for seat in session.get(RoomJob, job_id).seats]  # type: ignore[union-attr]
        if all(state in FINISHED for state in left):
            failed = left.count(SEAT_FAILED)
            self._finish(job_id, JOB_FAILED if failed else JOB_DONE,
                         f"{failed} of {len(left)} seats failed" if failed else None)

    def _deploy_seat(self, seat_id: int, shown: SeatUpdate, node: Node, requested_at: Any,
                     attempts: int, retries: int, image: Image, job_uuid: str,
                     multicast: dict) -> None:
        if requested_at is None:
            self._begin_deploy(seat_id, node, attempts, image, job_uuid, multicast, None)
            return
        if node.provision_state == states.DEPLOY_FAILED and node.reservation is None:
            reason = node.last_error or "the deploy failed"
            if attempts <= retries:
                LOG.info("room job %s: %s failed (%s); retry %d of %d", job_uuid, node.name,
                         reason, attempts, retries)
                self._begin_deploy(seat_id, node, attempts, image, job_uuid, multicast,
                                   f"attempt {attempts} failed: {reason}")
            else:
                self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error=reason))
            return
        seen = seat_from_node(node)
        if seen is not None and (seen.state, seen.progress) != (shown.state, shown.progress):
            self._set_seat(seat_id, seen)

    def _begin_deploy(self, seat_id: int, node: Node, attempts: int, image: Image,
                      job_uuid: str, multicast: dict, previous_error: str | None) -> None:
        """Bring the node to a deployable state, then hand it the deploy."""
        if node.maintenance:
            self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error="the node is in maintenance: "
                                               f"{node.maintenance_reason or 'no reason'}"))
            return
        state = node.provision_state
        if state in BUSY or node.reservation is not None:
            return  # on its way; next pass
        if state in PREPARE:
            self._hand_over(seat_id, node, PREPARE[state], {})
            return
        verb = DEPLOYABLE.get(state)
        if verb is None:
            self._set_seat(seat_id, SeatUpdate(
                SEAT_FAILED, error=f"the node is {state}: it must be available or active "
                                f"(last error: {node.last_error or 'none'})"))
            return
        info = {**(node.instance_info or {}), "image_source": image.uuid, "room_job": job_uuid}
        info.pop("multicast", None)
        if multicast:
            info["multicast"] = multicast
        if self._hand_over(seat_id, node, verb, {"instance_info": info}):
            with self.db.write() as session:
                session.execute(update(RoomJobSeat).where(RoomJobSeat.id == seat_id).values(
                    state=SEAT_POWERING, progress=0, attempts=attempts + 1,
                    requested_at=utcnow(), error=previous_error))

    def _hand_over(self, seat_id: int, node: Node, verb: str, extra: dict[str, Any]) -> bool:
        """Ask the node's conductor for ``verb`` through the one door; a refusal that will
        not change by itself fails the seat, a busy node is asked again on the next pass."""
        try:
            self.door.provision(node, verb, self.asker, extra)
            return True
        except InvalidRequest as error:
            self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error=error.message))
            return False
        except Busy:
            return False  # someone else acts on it; next pass
        except NoConductor as error:
            LOG.warning("room job: cannot hand node %s over: %s", node.uuid, error)
            return False

    def _cache_seat(self, seat_id: int, node: Node, version_id: int | None,
                    requested_at: Any) -> None:
        """A seat of a room opening a TP: its next network boot fetches the template into
        its cache (the seat's side: agent/session_sync.py ``fill``, reported through
        conductor/seat_sync.py, which moves the seat to writing, done or failed). The room's
        opening powered it on; a seat that was on comes at its next network boot, within
        ``callback_timeout``."""
        with self.db.read() as session:
            cache = session.scalar(select(SeatCache).where(SeatCache.node_id == node.id))
        if version_id is not None and cache is not None \
                and cache.origin_version_id == version_id and cache.origin_complete:
            self._set_seat(seat_id, SeatUpdate(SEAT_DONE, 100))
        elif requested_at is None:
            with self.db.write() as session:
                session.execute(update(RoomJobSeat).where(RoomJobSeat.id == seat_id).values(
                    state=SEAT_POWERING, progress=0, attempts=1, requested_at=utcnow()))
        elif (utcnow() - requested_at).total_seconds() > self.settings.callback_timeout:
            self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error=(
                f"the seat did not come for the template within "
                f"{self.settings.callback_timeout:.0f} s (off at the wall? not booting from "
                "the network?); a student's login there fetches it")))

    def _power_off_seat(self, seat_id: int, node: Node, requested_at: Any) -> None:
        if requested_at is None:
            if node.power_state == states.POWER_OFF:
                self._set_seat(seat_id, SeatUpdate(SEAT_DONE, 100))
                return
            try:
                self.door.set_power(node, states.POWER_OFF, self.asker)
            except InvalidRequest as error:
                self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error=error.message))
                return
            except (Busy, NoConductor):
                return
            with self.db.write() as session:
                session.execute(update(RoomJobSeat).where(RoomJobSeat.id == seat_id).values(
                    state=SEAT_POWERING, attempts=1, requested_at=utcnow()))
            return
        if node.reservation is not None or node.target_power_state is not None:
            return
        if node.power_state == states.POWER_OFF:
            self._set_seat(seat_id, SeatUpdate(SEAT_DONE, 100))
        else:
            self._set_seat(seat_id, SeatUpdate(SEAT_FAILED, error=node.last_error or
                                               f"the node is still {node.power_state}"))

    def _set_seat(self, seat_id: int, change: SeatUpdate) -> None:
        values: dict[str, Any] = {"state": change.state, "progress": change.progress}
        if change.error is not None:
            values["error"] = change.error
        with self.db.write() as session:
            session.execute(update(RoomJobSeat).where(RoomJobSeat.id == seat_id,
                                                      RoomJobSeat.state.not_in(FINISHED))
                            .values(**values))

    def _finish(self, job_id: int, state: str, error: str | None) -> None:
        with self.db.write() as session:
            session.execute(update(RoomJob).where(RoomJob.id == job_id,
                                                  RoomJob.state == JOB_RUNNING)
                            .values(state=state, finished_at=utcnow(), last_error=error))
        LOG.info("room job %s: %s%s", job_id, state, f" ({error})" if error else "")

    # -- multicast ---------------------------------------------------------------------
    def _ensure_sender(self, job_uuid: str, image: Image, multicast: dict[str, Any]) -> None:
        if job_uuid in self.senders:
            return
        from labmetal.conductor.multicast import MulticastConfig, MulticastSender
        from labmetal.agent.manifest import Manifest
        manifest = Manifest.from_json(self.store.manifest_path(image.uuid).read_text())
        group = MulticastGroup.from_dict(multicast)
        config = MulticastConfig.for_group(group, self.settings.multicast_rate,
                                           self.settings.multicast_ttl)
        sender = MulticastSender(manifest, self.store.packed_path(image.uuid), config, group.job)
        sender.start()
        self.senders[job_uuid] = sender
        LOG.info("room job %s: multicast sender on %s:%s", job_uuid, config.group, config.port)

    def _stop_finished_senders(self) -> None:
        if not self.senders:
            return
        with self.db.read() as session:
            running = set(session.scalars(select(RoomJob.uuid).where(
                RoomJob.uuid.in_(list(self.senders)), RoomJob.state == JOB_RUNNING,
                RoomJob.owner == self.hostname)))
        for job_uuid in list(self.senders):
            if job_uuid not in running:
                sender = self.senders.pop(job_uuid)
                sender.stop()
                status = sender.status()
                with self.db.write() as session:
                    job = session.scalar(select(RoomJob).where(RoomJob.uuid == job_uuid))
                    if job is not None:  # what the room cost the network, for the job's view
                        job.multicast = {**(job.multicast or {}), "sent_bytes": status.bytes_sent,
                                         "seats_complete": status.receivers_complete}
                LOG.info("room job %s: multicast sender stopped (%d bytes sent, %d seat(s) "
                         "complete)", job_uuid, status.bytes_sent, status.receivers_complete)


def sender_group(multicast: dict[str, Any] | None) -> dict[str, Any]:
    """A job's multicast group as seats and the sender read it (MulticastGroup), without
    the figures kept there once its sender stopped."""
    return {key: value for key, value in (multicast or {}).items()
            if key not in SENDER_FIGURES}


def cancel_waits(session: Any, job_id: int, user: str | None) -> None:
    """Seats of a cancelled job that still wait for their agent stop waiting (deploy failed,
    as an abort would); seats being written finish on their own."""
    node_ids = [seat.node_id for seat in session.get(RoomJob, job_id).seats]
    rows = session.scalars(select(Node).where(Node.id.in_(node_ids),
                                              Node.provision_state == states.DEPLOY_WAIT,
                                              Node.reservation.is_(None))).all()
    for node in rows:
        node.provision_state = states.DEPLOY_FAILED
        node.target_provision_state = None
        node.last_error = "the room job was cancelled"
        node.agent_token = node.agent_url = None
        node.agent_token_given = False
        node.agent_address = node.agent_alarm = None
        history.record(session, node.id, "provisioning",
                       "room job cancelled: wait call-back -> deploy failed", user=user)
