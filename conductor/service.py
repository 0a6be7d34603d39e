"""The conductor: heartbeat, hash-ring ownership, takeover of dead peers' nodes, the pending
actions of the nodes it has locked, and periodic power sync.

Loops (one thread each): heartbeat, scan (woken by the API or every scan_interval), power
sync. Actions run in a bounded worker pool; power sync has its own bounded pool.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from labmetal import history, states
from labmetal.conductor.actions import ACTIONS, NodeWork, Outcome
from labmetal.conductor.bootserver import BootServer
from labmetal.conductor.deploy import DEPLOY_ACTIONS, DeployContext
from labmetal.conductor.drivers import HardwareType
from labmetal.conductor.local_sessions import LocalSessionKeeper
from labmetal.conductor.power.base import (BmcUnreachable, InvalidDriverInfo, PowerError,
                                           PowerTarget)
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.roomjobs import RoomJobRunner
from labmetal.conductor.door import Asker, NodeDoor
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.conductor.wakeup import WakeServer
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.errors import Refused
from labmetal.images.store import ImageStore
from labmetal.models import Conductor, Node, Port, utcnow
from labmetal import seat_relay
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)
POWER_FAILURE = "power failure"


@dataclass
class SyncStats:
    cycles: int = 0
    nodes: int = 0
    seconds: float = 0.0
    mismatches: int = 0
    failures: int = 0


class ConductorService:
    def __init__(self, settings: Settings, db: Database, drivers: dict[str, HardwareType],
                 box: SecretBox, store: ImageStore):
        self.settings = settings
        self.hostname = settings.hostname
        self.db = db
        self.drivers = drivers
        self.box = box
        self.registry = ConductorRegistry(db, settings.conductor_dead_after)
        self.sync_stats = SyncStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._actions = ThreadPoolExecutor(settings.action_workers, thread_name_prefix="action")
        self._sync_pool = ThreadPoolExecutor(settings.power_sync_workers,
                                             thread_name_prefix="power-sync")
        self._in_flight: set[int] = set()
        self._in_flight_lock = threading.Lock()
        self._sync_failures: dict[int, int] = {}
        self._heartbeat_ok_at = time.monotonic()
        self._heartbeat_missed = False
        # Peers are not declared dead before this (see _in_grace): set at start and when
        # the database answers again after this conductor could not reach it.
        self._grace_until = time.monotonic() + settings.conductor_dead_after
        # When this conductor last came back (its start, or the database answering again):
        # an agent could not call back while it was away (see _expire_agent_waits).
        self._back_at = utcnow()
        self._missed_boots_for: datetime | None = None  # the return they were checked after
        self._waits_checked_at = 0.0
        self._threads: list[threading.Thread] = []
        self.actions = {**ACTIONS, **DEPLOY_ACTIONS}
        # Each part receives its group of the settings (labmetal/config.py).
        self.deploy_context = DeployContext(settings.deploy, db, box, settings.hostname, store)
        self.wake_server = WakeServer(settings.wake_listen, settings.hostname, self.wake,
                                      self.status)
        self.boot_server = BootServer(settings.boot, db, store, box.derive(seat_relay.PURPOSE))
        self.door = door = NodeDoor(settings.deploy, db, drivers, box,
                                    ConductorAPI(db, self.registry, settings.conductor,
                                                 local=self))
        self.room_jobs = RoomJobRunner(settings.room_jobs, db, self.registry, store,
                                       settings.hostname, door)
        self.local_sessions = LocalSessionKeeper(db, door, settings.hostname,
                                                 settings.session_disconnect_end)
        self._room_wake = threading.Event()

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        self.wake_server.start()
        self.boot_server.start()
        self._register()
        self._release_own_stale_locks()
        for loop in (self._heartbeat_loop, self._scan_loop, self._power_sync_loop,
                     self._room_job_loop):
            thread = threading.Thread(target=loop, daemon=True, name=loop.__name__.strip("_"))
            thread.start()
            self._threads.append(thread)
        LOG.info("conductor %s started (wake-up at %s)", self.hostname, self.wake_server.wake_url)

    def stop(self) -> None:
        """Finish running actions, then leave the ring so peers take the rest over at once."""
        self._stop.set()
        self._wake.set()
        self._room_wake.set()
        self._actions.shutdown(wait=True, cancel_futures=True)
        self._sync_pool.shutdown(wait=True, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=5)
        with self.db.write() as session:
            session.execute(update(Conductor).where(Conductor.hostname == self.hostname)
                            .values(online=False))
        self.wake_server.stop()
        self.boot_server.stop()
        self.room_jobs.stop()
        LOG.info("conductor %s stopped", self.hostname)

    def wake(self) -> None:
        self._wake.set()
        self._room_wake.set()

    def status(self) -> dict[str, Any]:
        with self._in_flight_lock:
            running = len(self._in_flight)
        return {"hostname": self.hostname, "running_actions": running,
                "power_sync": asdict(self.sync_stats)}

    def _register(self) -> None:
        values = {"online": True, "heartbeat_at": utcnow(), "wake_url": self.wake_server.wake_url,
                  "drivers": {"names": sorted(self.drivers)}}
        with self.db.write() as session:
            row = session.scalar(select(Conductor).where(Conductor.hostname == self.hostname))
            if row is None:
                session.add(Conductor(hostname=self.hostname, **values))
            else:
                for key, value in values.items():
                    setattr(row, key, value)

    def _release_own_stale_locks(self) -> None:
        """Locks this host held before a restart: plain locks are released; locks that carry
        a pending action are kept, and the scan resumes the action."""
        with self.db.write() as session:
            released = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                update(Node).where(Node.reservation == self.hostname,
                                   Node.pending_action.is_(None)).values(reservation=None)
            ).rowcount
        if released:
            LOG.info("released %d stale lock(s) left by an earlier run of %s", released,
                     self.hostname)

    # -- loops -------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                with self.db.write() as session:
                    session.execute(update(Conductor).where(Conductor.hostname == self.hostname)
                                    .values(heartbeat_at=utcnow(), online=True))
                self._heartbeat_ok_at = time.monotonic()
                if self._heartbeat_missed:
                    self._heartbeat_missed = False
                    self._grace_until = self._heartbeat_ok_at + \
                        self.settings.conductor_dead_after
                    self._back_at = utcnow()
                    LOG.warning("the database answers again; peers get %.0f s to beat "
                                "before any is taken for dead",
                                self.settings.conductor_dead_after)
            except Exception as error:  # noqa: BLE001 - the loop must go on
                if not self._heartbeat_missed:
                    LOG.warning("heartbeat failed: %s", str(error).splitlines()[0][:200])
                self._heartbeat_missed = True

    def _scan_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.scan_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.scan()
            except Exception:
                LOG.exception("scan failed")

    def _room_job_loop(self) -> None:
        while not self._stop.is_set():
            self._room_wake.wait(self.settings.room_job_interval)
            self._room_wake.clear()
            if self._stop.is_set() or not self._heartbeat_fresh():
                continue
            try:
                self.room_jobs.tick(take_over=not self._in_grace())
            except Exception:
                LOG.exception("room jobs pass failed")

    def _in_grace(self) -> bool:
        """Just back from an absence (this conductor's start, or a database it could not
        reach): a peer whose heartbeat is old may only have shared the absence, so none is
        taken for dead (its nodes and room jobs taken over) until the peers have had
        ``conductor_dead_after`` seconds to beat again. A peer that really died meanwhile
        is taken over right after."""
        return time.monotonic() < self._grace_until

    def _heartbeat_fresh(self) -> bool:
        return time.monotonic() - self._heartbeat_ok_at <= self.settings.conductor_dead_after

    def _power_sync_loop(self) -> None:
        while not self._stop.wait(self.settings.power_sync_interval):
            try:
                self.sync_power_states()
            except Exception:
                LOG.exception("power sync failed")

    # -- ownership and actions -----------------------------------------------------------
    def scan(self) -> None:
        if time.monotonic() - self._heartbeat_ok_at > self.settings.conductor_dead_after:
            LOG.warning("my heartbeat is older than %.0f s: peers may have taken my nodes; "
                        "not starting new work", self.settings.conductor_dead_after)
            return
        live = self.registry.live()
        if self.hostname not in live:
            live = self.registry.live(force=True)
        if not self._in_grace():
            self._take_over(set(live))
        self._dispatch()
        if time.monotonic() - self._waits_checked_at > 5:
            self._waits_checked_at = time.monotonic()
            self._expire_agent_waits()
            self._boot_again_missed_boots()
            self.boot_server.sync_hosts()
            ring = self.registry.ring()
            self.local_sessions.check(lambda node: ring.owner(node) == self.hostname)

    def _take_over(self, live: set[str]) -> None:
        """Locks held by conductors that are no longer alive: where the ring gives the node
        to me, I take the lock and its pending action, or release a bare lock."""
        ring = self.registry.ring()
        with self.db.read() as session:
            orphans = session.execute(
                select(Node.id, Node.uuid, Node.reservation, Node.pending_action)
                .where(Node.reservation.is_not(None), Node.reservation.not_in(live))).all()
        for node in orphans:
            if ring.owner(node.uuid) != self.hostname:
                continue
            with self.db.write() as session:
                taken = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                    update(Node).where(Node.id == node.id, Node.reservation == node.reservation)
                    .values(reservation=self.hostname if node.pending_action else None)
                ).rowcount
                if taken and node.pending_action:
                    history.record(session, node.id, "conductor",
                                   f"conductor {node.reservation} is gone; {self.hostname} "
                                   f"takes over '{node.pending_action}'", "WARNING",
                                   conductor=self.hostname)
            if taken:
                LOG.info("took over node %s from dead conductor %s (%s)", node.uuid,
                         node.reservation, node.pending_action or "lock released")

    def _dispatch(self) -> None:
        with self.db.read() as session:
            ids = session.scalars(select(Node.id).where(Node.reservation == self.hostname,
                                                        Node.pending_action.is_not(None))).all()
        with self._in_flight_lock:
            new = [node_id for node_id in ids if node_id not in self._in_flight]
            self._in_flight.update(new)
        for node_id in new:
            try:
                self._actions.submit(self._run, node_id)
            except RuntimeError:  # shutting down
                with self._in_flight_lock:
                    self._in_flight.discard(node_id)

    def _run(self, node_id: int) -> None:
        try:
            work = self._load(node_id)
            if work is None:
                return
            action = self.actions.get(work.action)
            if action is None:
                outcome = self._failed(work, f"unknown action '{work.action}'")
            else:
                try:
                    outcome = action(work)
                except Exception as error:  # a bug must not leave the node locked for ever
                    LOG.exception("action %s on node %s failed", work.action, work.uuid)
                    outcome = self._failed(work, f"internal error during '{work.action}': "
                                                 f"{type(error).__name__}: {error}")
            self._commit(work, outcome)
        except Exception:
            LOG.exception("cannot carry out the pending action of node id %s", node_id)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(node_id)

    def _load(self, node_id: int) -> NodeWork | None:
        with self.db.read() as session:
            node = session.get(Node, node_id)
            if node is None or node.reservation != self.hostname or not node.pending_action:
                return None
            macs = list(session.scalars(select(Port.address).where(Port.node_id == node_id,
                                                                   Port.pxe_enabled.is_(True))))
        driver = self.drivers.get(node.driver)
        if driver is None:
            raise RuntimeError(f"node {node.uuid} has unknown driver {node.driver}")
        try:
            info = self.box.open_all(node.driver_info)
        except ValueError as error:
            info = {}
            LOG.error("node %s: %s", node.uuid, error)
        return NodeWork(id=node.id, uuid=node.uuid, driver=driver,
                        target=PowerTarget(node.uuid, info, macs), action=node.pending_action,
                        power_state=node.power_state, provision_state=node.provision_state,
                        driver_internal_info=dict(node.driver_internal_info or {}),
                        node=node, ctx=self.deploy_context)

    @staticmethod
    def _failed(work: NodeWork, message: str) -> Outcome:
        values: dict[str, Any] = {"last_error": message, "target_power_state": None}
        if work.provision_state in states.FAILURE_STATE:
            values.update(provision_state=states.FAILURE_STATE[work.provision_state],
                          target_provision_state=None)
        return Outcome(values, [("error", "ERROR", message)])

    def _commit(self, work: NodeWork, outcome: Outcome) -> None:
        values = dict(outcome.values)
        if "provision_state" in values:
            values["provision_updated_at"] = utcnow()
        with self.db.write() as session:
            done = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                update(Node).where(Node.id == work.id, Node.reservation == self.hostname,
                                   Node.pending_action == work.action)
                .values(reservation=None, pending_action=None, conductor_affinity=self.hostname,
                        **values)).rowcount
            if done:
                for event_type, severity, text in outcome.events:
                    history.record(session, work.id, event_type, text, severity,
                                   conductor=self.hostname)
        if not done:
            LOG.warning("node %s: lost my lock during '%s'; its new owner carries on",
                        work.uuid, work.action)

    def _boot_again_missed_boots(self) -> None:
        """Once per return (start, or database back), ``missed_boot_after`` seconds after
        it: my seats still waiting for an agent they were switched on for before it are
        switched on (or rebooted) again. While labmetal was away, a PC's network boot found
        no TFTP, boot script or API and the PC booted its next device, its disk; a second
        boot reaches labmetal. A seat whose agent did call back has left the wait."""
        if self._missed_boots_for == self._back_at:
            return
        if utcnow() - self._back_at < timedelta(seconds=self.settings.missed_boot_after):
            return
        self._missed_boots_for = self._back_at
        ring = self.registry.ring()
        with self.db.read() as session:
            nodes = session.scalars(
                select(Node).where(Node.provision_state.in_(list(states.AGENT_WAIT)),
                                   Node.reservation.is_(None), Node.maintenance.is_(False),
                                   Node.provision_updated_at < self._back_at)).all()
        for node in nodes:
            if ring.owner(node.uuid) != self.hostname:
                continue
            try:
                self.door.boot(
                    node, "again: labmetal was away when the seat was switched on for "
                    f"'{node.provision_state}', and its agent never called",
                    Asker(conductor=self.hostname))
            except Refused as error:  # busy, or Wake-on-LAN and already on: left to time out
                LOG.warning("node %s: not booted again: %s", node.uuid, error)
                continue
            with self.db.write() as session:  # switched on anew: its wait starts anew
                session.execute(update(Node).where(
                    Node.id == node.id, Node.provision_state == node.provision_state)
                    .values(provision_updated_at=utcnow()))

    def _expire_agent_waits(self) -> None:
        """Nodes of mine waiting for their agent longer than callback_timeout fail (the
        agent never came, or vanished before calling back). The wait counts from when this
        conductor came back if it began before: a seat that booted while labmetal was
        stopped (an upgrade) or could not reach its database had no one to call back to, and
        gets its whole callback_timeout once labmetal is there again."""
        cutoff = utcnow() - timedelta(seconds=self.settings.callback_timeout)
        if self._back_at > cutoff:
            return
        ring = self.registry.ring()
        with self.db.read() as session:
            rows = session.execute(
                select(Node.id, Node.uuid, Node.provision_state)
                .where(Node.provision_state.in_(list(states.AGENT_WAIT)),
                       Node.reservation.is_(None), Node.provision_updated_at < cutoff)).all()
        for row in rows:
            if ring.owner(row.uuid) != self.hostname:
                continue
            failed = states.FAILURE_STATE[row.provision_state]
            message = (f"Timeout reached while waiting for the deploy agent of node {row.uuid} "
                       f"to call back ({self.settings.callback_timeout:.0f} s in "
                       f"'{row.provision_state}')")
            with self.db.write() as session:
                done = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                    update(Node).where(Node.id == row.id, Node.reservation.is_(None),
                                       Node.provision_state == row.provision_state)
                    .values(provision_state=failed, target_provision_state=None,
                            last_error=message, provision_updated_at=utcnow(),
                            agent_url=None, agent_token=None, agent_token_given=False,
                            agent_address=None, agent_alarm=None)).rowcount
                if done:
                    history.record(session, row.id, "provisioning", message, "ERROR",
                                   conductor=self.hostname)
                    history.record(session, row.id, "provisioning",
                                   f"{row.provision_state} -> {failed}", conductor=self.hostname)

    # -- power sync ------------------------------------------------------------------------
    def sync_power_states(self) -> SyncStats:
        """Read every owned node's power state from its BMC (bounded concurrency) and record
        changes made outside labmetal. Nodes that are locked are being acted on: skipped."""
        started = time.monotonic()
        ring = self.registry.ring()
        with self.db.read() as session:
            rows = session.execute(
                select(Node.id, Node.uuid, Node.driver, Node.driver_info, Node.power_state,
                       Node.fault, Node.maintenance)
                .where(Node.reservation.is_(None),
                       Node.provision_state.not_in([states.ENROLL, states.VERIFYING]),
                       or_(Node.maintenance.is_(False), Node.fault == POWER_FAILURE))).all()
        mine = [row for row in rows if row.driver in self.drivers
                and not self.drivers[row.driver].power.assumed_state
                and ring.owner(row.uuid) == self.hostname]

        def read_state(row: Any) -> tuple[Any, str | None, PowerError | ValueError | None]:
            try:
                target = PowerTarget(row.uuid, self.box.open_all(row.driver_info))
                return row, self.drivers[row.driver].power.get_power_state(target), None
            except (PowerError, InvalidDriverInfo, ValueError) as error:
                return row, None, error

        results = list(self._sync_pool.map(read_state, mine))
        mismatches = failures = 0
        went_off = []  # seats read off where the last read said on
        with self.db.write() as session:
            for row, power_state, error in results:
                if error is not None:
                    failures += 1
                    self._record_sync_failure(session, row, error)
                    continue
                self._sync_failures.pop(row.id, None)
                if row.fault == POWER_FAILURE:
                    self._conditional_update(session, row, maintenance=False,
                                             maintenance_reason=None, fault=None, last_error=None,
                                             power_state=power_state)
                    history.record(session, row.id, "power", "BMC answers again: power failure "
                                   "cleared", conductor=self.hostname)
                elif power_state != row.power_state:
                    mismatches += 1
                    if self._conditional_update(session, row, power_state=power_state):
                        if (row.power_state, power_state) == (states.POWER_ON,
                                                              states.POWER_OFF):
                            went_off.append(row.id)
                        history.record(session, row.id, "power",
                                       f"power state changed outside labmetal: '{row.power_state}'"
                                       f" -> '{power_state}'", "WARNING", conductor=self.hostname)
        self.local_sessions.seats_powered_off(went_off)  # a local session there ended
        stats = self.sync_stats
        self.sync_stats = SyncStats(stats.cycles + 1, len(mine), time.monotonic() - started,
                                    mismatches, failures)
        LOG.info("power sync: %d node(s) in %.2f s, %d changed outside labmetal, %d failed",
                 len(mine), self.sync_stats.seconds, mismatches, failures)
        return self.sync_stats

    @staticmethod
    def _conditional_update(session: Any, row: Any, **values: Any) -> bool:
        return session.execute(
            update(Node).where(Node.id == row.id, Node.reservation.is_(None),
                               Node.power_state.is_(row.power_state) if row.power_state is None
                               else Node.power_state == row.power_state)
            .values(**values)).rowcount == 1

    def _record_sync_failure(self, session: Any, row: Any, failure: Exception) -> None:
        """Count failures toward maintenance, but not a BMC that answered while the network
        lost the rest: that BMC works, and the next sync will most likely reach it (issue
        17: at 20 % loss each way, nodes went to maintenance that were fine)."""
        error = str(failure)
        if isinstance(failure, BmcUnreachable) and not failure.silent:
            self._sync_failures.pop(row.id, None)
            history.record(session, row.id, "power", f"power sync failed: {error}", "WARNING",
                           conductor=self.hostname)
            return
        count = self._sync_failures.get(row.id, 0) + 1
        self._sync_failures[row.id] = count
        if count == 1:
            history.record(session, row.id, "power", f"power sync failed: {error}", "WARNING",
                           conductor=self.hostname)
        if count == self.settings.power_sync_max_failures and row.fault != POWER_FAILURE:
            message = (f"power sync failed {count} times in a row; node put in maintenance: "
                       f"{error}")
            if self._conditional_update(session, row, maintenance=True, fault=POWER_FAILURE,
                                        maintenance_reason=message, last_error=message):
                history.record(session, row.id, "power", message, "ERROR",
                               conductor=self.hostname)
