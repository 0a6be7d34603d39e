"""The lifecycles of room jobs, their seats, student sessions and images, as data.

The node's lifecycle (``labmetal/states.py``) is Ironic's: verbs that start conductor work.
These are simpler — a row only moves from one state to another — so each is a table of the
states a state may go to, and one check. They live apart from the node's so that
``states`` stays one concept, and ``states.ACTIVE`` never means an image's status.

The values are what the database stores and the API returns; never change one.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# -- a room job: "image room Y" or "power room Y off", now or at a set time ---------------
JOB_SCHEDULED = "scheduled"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"  # some seats failed after their retries, or the image went
JOB_CANCELLED = "cancelled"

# -- one seat of a room job, as its tile shows it -----------------------------------------
SEAT_QUEUED = "queued"
SEAT_POWERING = "powering"
SEAT_BOOTING = "booting"
SEAT_WRITING = "writing"
SEAT_VERIFYING = "verifying"
SEAT_DONE = "done"
SEAT_FAILED = "failed"
SEAT_CANCELLED = "cancelled"
SEAT_IDLE = "idle"  # shown for a seat in no job; never stored

# -- a student's session: a copy-on-write disk a seat boots over iSCSI ---------------------
SESSION_STOPPED = "stopped"
SESSION_STARTING = "starting"
SESSION_RUNNING = "running"  # exported to its seat, or (local) running from its disk
# local sessions: the seat holds the newest copy and uploads it (at its next boot, or now)
SESSION_SYNCING = "syncing"
SESSION_FAILED = "failed"  # its start or its target was lost; its data stays
SESSION_DELETED = "deleted"  # its data is gone; the row stays for the record

# -- an image's status -------------------------------------------------------------------
IMAGE_QUEUED = "queued"  # recorded, no data yet
IMAGE_ACTIVE = "active"


class BadTransition(ValueError):
    """A row was to move where its lifecycle does not go."""


@dataclass(frozen=True)
class Lifecycle:
    name: str  # what the rows are, for messages: "room job"
    initial: str  # the state a new row has
    moves: dict[str, frozenset[str]]  # state -> the states it may go to

    @property
    def states(self) -> frozenset[str]:
        return frozenset(self.moves)

    @property
    def terminal(self) -> frozenset[str]:
        return frozenset(state for state, after in self.moves.items() if not after)

    def allows(self, old: str, new: str) -> bool:
        return new in self.moves.get(old, ())

    def check(self, old: str, new: str) -> None:
        if not self.allows(old, new):
            raise BadTransition(f"the {self.name} cannot go from {old} to {new}")


def _lifecycle(name: str, initial: str, moves: dict[str, Iterable[str]]) -> Lifecycle:
    return Lifecycle(name, initial, {state: frozenset(after) for state, after in moves.items()})


# A retried seat runs its finished job again; a cancelled job stays cancelled.
ROOM_JOB = _lifecycle("room job", JOB_SCHEDULED, {
    JOB_SCHEDULED: {JOB_RUNNING, JOB_CANCELLED},
    JOB_RUNNING: {JOB_DONE, JOB_FAILED, JOB_CANCELLED},
    JOB_DONE: {JOB_RUNNING},
    JOB_FAILED: {JOB_RUNNING},
    JOB_CANCELLED: set(),
})
JOB_ACTIVE = (JOB_SCHEDULED, JOB_RUNNING)  # a conductor carries these on
JOB_FINISHED = (JOB_DONE, JOB_FAILED, JOB_CANCELLED)

# The seat follows its node (conductor/roomjobs.py seat_from_node), so while in progress
# it may show any step again (a retry powers the node anew); a finished seat is queued
# again only by a teacher's retry.
SEAT_IN_PROGRESS = frozenset({SEAT_QUEUED, SEAT_POWERING, SEAT_BOOTING, SEAT_WRITING,
                              SEAT_VERIFYING})
SEAT_FINISHED = (SEAT_DONE, SEAT_FAILED, SEAT_CANCELLED)
ROOM_JOB_SEAT = _lifecycle("room job seat", SEAT_QUEUED, {
    **{state: (SEAT_IN_PROGRESS - {SEAT_QUEUED, state}) | set(SEAT_FINISHED)
       for state in SEAT_IN_PROGRESS},
    **{state: {SEAT_QUEUED} for state in SEAT_FINISHED},
})

# A failed start goes back to the state it started from; a failed session starts again.
SESSION = _lifecycle("session", SESSION_STOPPED, {
    SESSION_STOPPED: {SESSION_STARTING, SESSION_DELETED},
    SESSION_STARTING: {SESSION_RUNNING, SESSION_STOPPED, SESSION_FAILED},
    SESSION_RUNNING: {SESSION_STOPPED, SESSION_SYNCING, SESSION_FAILED},
    SESSION_SYNCING: {SESSION_STOPPED, SESSION_RUNNING, SESSION_FAILED},
    SESSION_FAILED: {SESSION_STARTING, SESSION_STOPPED, SESSION_DELETED},
    SESSION_DELETED: set(),
})
SESSION_LIVE = (SESSION_STOPPED, SESSION_STARTING, SESSION_RUNNING, SESSION_SYNCING,
                SESSION_FAILED)
SESSION_BUSY = (SESSION_STARTING, SESSION_RUNNING, SESSION_SYNCING)  # on a seat

# Data arrives once (images/registry.py); an image is deleted, not moved back.
IMAGE = _lifecycle("image", IMAGE_QUEUED, {
    IMAGE_QUEUED: {IMAGE_ACTIVE},
    IMAGE_ACTIVE: set(),
})
