"""Room jobs carried out: the owning conductor starts due jobs, asks each seat's node for the
next step through the usual node hand-over (rpcapi), reads the nodes' states back into the
seats' states, retries failed seats, and runs the job's multicast sender.

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
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI, NoConductor, NodeLocked, Unchanged
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.images.store import ImageStore
from labmetal.models import Image, Node, RoomJob, RoomJobSeat, utcnow

LOG = logging.getLogger(__name__)

FINISHED = ("done", "failed", "cancelled")
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
        return SeatUpdate("done", 100)
    if state == states.DEPLOY_WAIT:
        return SeatUpdate("booting")
    if state == states.DEPLOYING:
        total, done = int(step.get("total") or 0), int(step.get("done") or 0)
        if step.get("step") and total:
            if done >= total:
                return SeatUpdate("verifying", 100)
            return SeatUpdate("writing", min(99, done * 100 // total))
        return SeatUpdate("writing" if node.agent_url else "powering")
    return None


class RoomJobRunner:
    def __init__(self, settings: Settings, db: Database, registry: ConductorRegistry,
                 store: ImageStore, hostname: str, handover: ConductorAPI) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry
        self.store = store
        self.hostname = hostname
        self.handover = handover
        self.senders: dict[str, Any] = {}  # job uuid -> MulticastSender

    # -- the pass ----------------------------------------------------------------------
    def tick(self) -> None:
        self._claim()
        with self.db.read() as session:
            jobs = session.scalars(select(RoomJob).where(RoomJob.owner == self.hostname,
                                                         RoomJob.state.in_(("scheduled",
                                                                            "running")))).all()
            ids = [(job.id, job.state, job.scheduled_at) for job in jobs]
        now = utcnow()
        for job_id, state, scheduled_at in ids:
            try:
                if state == "scheduled" and scheduled_at <= now:
                    self._start(job_id)
                self._advance(job_id)
            except Exception:
                LOG.exception("room job %s: pass failed; retried on the next one", job_id)
        self._stop_finished_senders()

    def stop(self) -> None:
        for sender in self.senders.values():
            sender.stop()
        self.senders.clear()

    def _claim(self) -> None:
        live = set(self.registry.live())
        ring = self.registry.ring()
        with self.db.read() as session:
            rows = session.execute(select(RoomJob.id, RoomJob.uuid, RoomJob.owner).where(
                RoomJob.state.in_(("scheduled", "running")),
                or_(RoomJob.owner.is_(None), RoomJob.owner.not_in(live)))).all()
        for job_id, uuid, owner in rows:
            if ring.owner(uuid) != self.hostname:
                continue
            with self.db.write() as session:
                claimed = session.execute(
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
            if job is None or job.state != "scheduled":
                return
            job.state, job.started_at = "running", utcnow()
            if job.action == "deploy":
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
            select(RoomJob.multicast).where(RoomJob.state == "running",
                                            RoomJob.id != job.id))}
        network = ipaddress.IPv4Network(self.settings.multicast_groups)
        group = next((str(host) for host in network.hosts() if str(host) not in taken), None)
        if group is None:
            raise RuntimeError(f"every multicast group of {network} is in use")
        host = urlsplit(self.settings.seat_base_url).hostname or "127.0.0.1"
        port = self.settings.multicast_port
        return {"group": group, "port": port, "sender": f"{host}:{port + 1}",
                "interface": host, "job": job.id}

    def _schedule_next(self, session: Any, job: RoomJob) -> None:
        """A repeating job leaves its next occurrence behind when it starts."""
        at = schedule.next_occurrence(job.scheduled_at, job.repeat, self.settings.timezone)
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
            if job is None or job.state != "running":
                return
            seats = [(seat.id, SeatUpdate(seat.state, seat.progress), seat.requested_at,
                      seat.attempts, seat.node_id) for seat in job.seats]
            image = session.get(Image, job.image_id) if job.image_id else None
            action, retries, uuid = job.action, job.retries, job.uuid
            multicast = dict(job.multicast or {})
        if action == "deploy" and image is None:
            self._finish(job_id, "failed", "the job's image was deleted")
            return
        if multicast:
            self._ensure_sender(uuid, image, multicast)
        for seat_id, shown, requested_at, attempts, node_id in seats:
            if shown.state in FINISHED:
                continue
            with self.db.read() as session:
                node = session.get(Node, node_id)
            if node is None:
                self._set_seat(seat_id, SeatUpdate("failed", error="the node was deleted"))
            elif action == "power-off":
                self._power_off_seat(seat_id, node, requested_at)
            else:
                self._deploy_seat(seat_id, shown, node, requested_at, attempts, retries,
                                  image, uuid, multicast)
        with self.db.read() as session:
            left = [seat.state for seat in session.get(RoomJob, job_id).seats]
        if all(state in FINISHED for state in left):
            failed = left.count("failed")
            self._finish(job_id, "failed" if failed else "done",
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
                self._set_seat(seat_id, SeatUpdate("failed", error=reason))
            return
        seen = seat_from_node(node)
        if seen is not None and (seen.state, seen.progress) != (shown.state, shown.progress):
            self._set_seat(seat_id, seen)

    def _begin_deploy(self, seat_id: int, node: Node, attempts: int, image: Image,
                      job_uuid: str, multicast: dict, previous_error: str | None) -> None:
        """Bring the node to a deployable state, then hand it the deploy."""
        if node.maintenance:
            self._set_seat(seat_id, SeatUpdate("failed", error="the node is in maintenance: "
                                               f"{node.maintenance_reason or 'no reason'}"))
            return
        state = node.provision_state
        if state in BUSY or node.reservation is not None:
            return  # on its way; next pass
        if state in PREPARE:
            self._hand_over(node, PREPARE[state], {})
            return
        verb = DEPLOYABLE.get(state)
        if verb is None:
            self._set_seat(seat_id, SeatUpdate(
                "failed", error=f"the node is {state}: it must be available or active "
                                f"(last error: {node.last_error or 'none'})"))
            return
        info = {**(node.instance_info or {}), "image_source": image.uuid, "room_job": job_uuid}
        info.pop("multicast", None)
        if multicast:
            info["multicast"] = multicast
        if self._hand_over(node, verb, {"instance_info": info}):
            with self.db.write() as session:
                session.execute(update(RoomJobSeat).where(RoomJobSeat.id == seat_id).values(
                    state="powering", progress=0, attempts=attempts + 1,
                    requested_at=utcnow(), error=previous_error))

    def _hand_over(self, node: Node, verb: str, extra: dict[str, Any]) -> bool:
        step = states.transition(node.provision_state, verb)
        values = {"provision_state": step.state, "target_provision_state": step.target,
                  "provision_updated_at": utcnow(), "last_error": None, **extra}
        event = ("provisioning", f"'{verb}' requested by a room job: "
                                 f"{node.provision_state} -> {step.state}")
        condition = (Node.provision_state == node.provision_state,)
        try:
            if step.action is None:
                with self.db.write() as session:
                    done = session.execute(update(Node).where(
                        Node.id == node.id, Node.reservation.is_(None), *condition)
                        .values(**values)).rowcount
                    if done:
                        history.record(session, node.id, *event, conductor=self.hostname)
                return bool(done)
            self.handover.request(node, step.action, values, condition, event, None)
            return True
        except (NodeLocked, Unchanged):
            return False  # someone else acts on it; next pass
        except NoConductor as error:
            LOG.warning("room job: cannot hand node %s over: %s", node.uuid, error)
            return False

    def _power_off_seat(self, seat_id: int, node: Node, requested_at: Any) -> None:
        if requested_at is None:
            if node.power_state == states.POWER_OFF:
                self._set_seat(seat_id, SeatUpdate("done", 100))
                return
            values = {"target_power_state": states.POWER_OFF, "last_error": None}
            try:
                self.handover.request(node, states.POWER_OFF, values, (),
                                      ("power", "'power off' requested by a room job"), None)
            except (NodeLocked, Unchanged, NoConductor):
                return
            with self.db.write() as session:
                session.execute(update(RoomJobSeat).where(RoomJobSeat.id == seat_id).values(
                    state="powering", attempts=1, requested_at=utcnow()))
            return
        if node.reservation is not None or node.target_power_state is not None:
            return
        if node.power_state == states.POWER_OFF:
            self._set_seat(seat_id, SeatUpdate("done", 100))
        else:
            self._set_seat(seat_id, SeatUpdate("failed", error=node.last_error or
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
                                                  RoomJob.state == "running")
                            .values(state=state, finished_at=utcnow(), last_error=error))
        LOG.info("room job %s: %s%s", job_id, state, f" ({error})" if error else "")

    # -- multicast ---------------------------------------------------------------------
    def _ensure_sender(self, job_uuid: str, image: Image, multicast: dict[str, Any]) -> None:
        if job_uuid in self.senders:
            return
        from labmetal.conductor.multicast import MulticastConfig, MulticastSender
        from labmetal.agent.manifest import Manifest
        manifest = Manifest.from_json(self.store.manifest_path(image.uuid).read_text())
        config = MulticastConfig(group=multicast["group"], port=int(multicast["port"]),
                                 control_port=int(multicast["sender"].rpartition(":")[2]),
                                 interface_ip=multicast["interface"],
                                 rate_ceiling=self.settings.multicast_rate,
                                 ttl=self.settings.multicast_ttl)
        sender = MulticastSender(manifest, self.store.packed_path(image.uuid), config,
                                 int(multicast["job"]))
        sender.start()
        self.senders[job_uuid] = sender
        LOG.info("room job %s: multicast sender on %s:%s", job_uuid, config.group, config.port)

    def _stop_finished_senders(self) -> None:
        if not self.senders:
            return
        with self.db.read() as session:
            running = set(session.scalars(select(RoomJob.uuid).where(
                RoomJob.uuid.in_(list(self.senders)), RoomJob.state == "running",
                RoomJob.owner == self.hostname)))
        for job_uuid in list(self.senders):
            if job_uuid not in running:
                self.senders.pop(job_uuid).stop()
                LOG.info("room job %s: multicast sender stopped", job_uuid)


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
